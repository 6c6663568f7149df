"""Triton logsumexp, forward and backward.

Forward: lse = m + log1p(s') per row (DESIGN.md), in x's dtype and in float64 (for the
backward). Rows of up to MAX_BLOCK_N elements: several rows per program, one read. Longer
rows: SPLIT_CHUNK elements per program write their (m, s'), then one program per row merges
them (still one read of x).

Backward: dx = dy * exp(x - lse), a pure map. The float64 lse is passed as hi + lo in the
accumulation dtype, and x - lse taken as (x - hi) - lo: exact in its first step for the
entries near lse, so the gradient keeps its precision at large offsets.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from . import common
from .common import MAX_BLOCK_N
from .softmax import _row_total, row_parts


@triton.jit
def _store_lse(OUT_ptr, LSE_ptr, r, m, s, mask, ACC: tl.constexpr):
    # A NaN in the row makes s' NaN: the result is NaN. Else an infinite max is the result:
    # -inf (all -inf) or +inf (a +inf), whatever s' is.
    m64 = m.to(tl.float64)
    lse = tl.where(tl.abs(m) == float("inf"), m64, m64 + common.log1p(s).to(tl.float64))
    lse = tl.where(s != s, float("nan"), lse)
    tl.store(LSE_ptr + r, lse, mask=mask)
    tl.store(OUT_ptr + r, lse.to(ACC).to(OUT_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _logsumexp_fwd_kernel(
    X_ptr,
    OUT_ptr,
    LSE_ptr,
    rows,
    n,
    inner,
    stride_xo,
    stride_xn,
    stride_xi,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    o, i = r // inner, r % inner
    cols = tl.arange(0, BLOCK_N).to(tl.int64)
    valid = (r < rows)[:, None] & (cols < n)[None, :]
    x_at = (o * stride_xo + i * stride_xi)[:, None] + cols[None, :] * stride_xn
    x = tl.load(X_ptr + x_at, mask=valid, other=-float("inf")).to(ACC)
    m, s = common.tile_stats(x, valid)
    _store_lse(OUT_ptr, LSE_ptr, r, m, s, r < rows, ACC)


@triton.jit
def _logsumexp_finish_kernel(
    M_ptr, S_ptr, OUT_ptr, LSE_ptr, parts, ACC: tl.constexpr, PARTS: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    m, s = _row_total(M_ptr, S_ptr, row, parts, PARTS)
    _store_lse(OUT_ptr, LSE_ptr, row, m, s, True, ACC)


def forward(x: torch.Tensor, dim: int, keepdim: bool) -> tuple[torch.Tensor, torch.Tensor]:
    v = common.rows_view(x, dim)
    outer, n, inner = v.shape
    rows = outer * inner
    out = torch.empty(rows, dtype=x.dtype, device=x.device)
    lse = torch.empty(rows, dtype=torch.float64, device=x.device)
    acc = common.accumulator(x.dtype)
    strides = (v.stride(0), v.stride(1), v.stride(2))
    if n <= MAX_BLOCK_N:
        block_r, block_n, warps = common.launch_shape(n)
        wrap_triton(_logsumexp_fwd_kernel)[(triton.cdiv(rows, block_r),)](
            v,
            out,
            lse,
            rows,
            n,
            inner,
            *strides,
            ACC=acc,
            BLOCK_R=block_r,
            BLOCK_N=block_n,
            num_warps=warps,
        )
    else:
        m_ws, s_ws, parts = row_parts(v, acc, common.workspace_dtype(x.dtype))
        wrap_triton(_logsumexp_finish_kernel)[(rows,)](
            m_ws,
            s_ws,
            out,
            lse,
            parts,
            ACC=acc,
            PARTS=triton.next_power_of_2(parts),
        )
    shape = list(x.shape)
    if keepdim:
        shape[dim] = 1
    else:
        del shape[dim]
    return out.view(shape), lse.view(shape)


@triton.jit
def _logsumexp_bwd_kernel(
    G_ptr,
    HI_ptr,
    LO_ptr,
    X_ptr,
    DX_ptr,
    rows,
    n,
    inner,
    stride_xo,
    stride_xn,
    stride_xi,
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1).to(tl.int64)
    o, i = row // inner, row % inner
    cols = part * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    valid = cols < n
    g = tl.load(G_ptr + row).to(ACC)
    hi = tl.load(HI_ptr + row).to(ACC)
    lo = tl.load(LO_ptr + row).to(ACC)
    x = tl.load(X_ptr + o * stride_xo + i * stride_xi + cols * stride_xn, mask=valid, other=0.0).to(
        ACC
    )
    dx = g * tl.exp((x - hi) - lo)
    tl.store(DX_ptr + o * n * inner + i + cols * inner, dx.to(DX_ptr.dtype.element_ty), mask=valid)


def backward(grad, x, result, dim: int, keepdim: bool) -> torch.Tensor:
    v = common.rows_view(x, dim)
    outer, n, inner = v.shape
    acc_dtype = common.workspace_dtype(x.dtype)
    g = common.per_row(grad, acc_dtype)
    lse = common.per_row(result, torch.float64)
    hi = lse.to(acc_dtype)
    lo = torch.where(lse.isfinite(), lse - hi.double(), 0.0).to(acc_dtype)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block_n = min(4096, max(16, triton.next_power_of_2(n)))
    grid = (outer * inner, triton.cdiv(n, block_n))
    wrap_triton(_logsumexp_bwd_kernel)[grid](
        g,
        hi,
        lo,
        v,
        dx,
        outer * inner,
        n,
        inner,
        v.stride(0),
        v.stride(1),
        v.stride(2),
        ACC=common.accumulator(x.dtype),
        BLOCK_N=block_n,
        num_warps=4,
    )
    return dx
