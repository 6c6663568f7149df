"""Triton logsumexp, forward and backward.

Forward: lse = m + log1p(s') per row (docs/design.md), in x's dtype and in float64 (for the
backward). Rows of up to MAX_BLOCK_N elements: several rows per program, one read. Longer
rows: SPLIT_CHUNK elements per program write their (m, s'), one program per row merges
them, and the lse of the merged states is stored (still one read of x).

Backward: dx = dy * exp((x - hi) - lo), a pure map over the per-row dy, hi and lo the router
gives (the float64 lse split as hi + lo in the accumulation dtype).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..._numerics import accumulation_dtype
from . import common
from .common import MAX_BLOCK_N
from .softmax import row_states

# Rows per program of the split path's last step (the lse of merged row states).
FINISH_ROWS = 256


@triton.jit
def _store_lse(OUT_ptr, LSE_ptr, r, m, s, mask, ACC: tl.constexpr):
    lse = common.finish_lse(m, s)
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
    ROW_M_ptr, ROW_S_ptr, OUT_ptr, LSE_ptr, rows, ACC: tl.constexpr, BLOCK_R: tl.constexpr
):
    """The lse of BLOCK_R rows' merged (m, s')."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    m = tl.load(ROW_M_ptr + r, mask=r < rows, other=0.0)
    s = tl.load(ROW_S_ptr + r, mask=r < rows, other=0.0)
    _store_lse(OUT_ptr, LSE_ptr, r, m, s, r < rows, ACC)


@triton_op("stablekernels::_triton_logsumexp", mutates_args={})
def forward(x: torch.Tensor, dim: int, keepdim: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The logsumexp kernel of the contract: (out in x.dtype, lse in float64)."""
    v = common.rows_view(x, dim)
    outer, n, inner = v.shape
    rows = outer * inner
    out = torch.empty(rows, dtype=x.dtype, device=x.device)
    lse = torch.empty(rows, dtype=torch.float64, device=x.device)
    acc = common.accumulator(x.dtype)
    strides = (v.stride(0), v.stride(1), v.stride(2))
    with common.on_device(x):
        if n <= MAX_BLOCK_N:
            block_r, block_n, warps = common.launch_shape(n)
            wrap_triton(_logsumexp_fwd_kernel)[common.grid(triton.cdiv(rows, block_r))](
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
            row_m, row_s, _ = row_states(v, acc, accumulation_dtype(x.dtype))
            wrap_triton(_logsumexp_finish_kernel)[common.grid(triton.cdiv(rows, FINISH_ROWS))](
                row_m, row_s, out, lse, rows, ACC=acc, BLOCK_R=FINISH_ROWS, num_warps=4
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
    LSE_ptr,
    X_ptr,
    DX_ptr,
    rows,
    n,
    inner,
    stride_g,
    stride_xo,
    stride_xn,
    stride_xi,
    tiles,
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Tile `tile` of row `row` (program row * tiles + tile): dx = g * exp((x - hi) - lo),
    hi + lo the row's fp64 lse split into ACC (common.split_lse)."""
    program = tl.program_id(0).to(tl.int64)
    row, tile = program // tiles, program % tiles
    o, i = row // inner, row % inner
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    valid = cols < n
    g = tl.load(G_ptr + row * stride_g).to(ACC)
    hi, lo = common.split_lse(tl.load(LSE_ptr + row), ACC)
    x = tl.load(X_ptr + o * stride_xo + i * stride_xi + cols * stride_xn, mask=valid, other=0.0).to(
        ACC
    )
    dx = g * tl.exp((x - hi) - lo)
    tl.store(DX_ptr + o * n * inner + i + cols * inner, dx.to(DX_ptr.dtype.element_ty), mask=valid)


@triton_op("stablekernels::_triton_logsumexp_backward", mutates_args={})
def backward(grad: torch.Tensor, x: torch.Tensor, lse: torch.Tensor, dim: int) -> torch.Tensor:
    """The logsumexp_backward kernel of the contract: grad one value per row of x's dtype
    (flat in row order, any stride), lse the rows' float64 logsumexp (contiguous)."""
    v = common.rows_view(x, dim)
    outer, n, inner = v.shape
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block_n = min(4096, max(16, triton.next_power_of_2(n)))
    tiles = triton.cdiv(n, block_n)
    with common.on_device(x):
        wrap_triton(_logsumexp_bwd_kernel)[common.grid(outer * inner * tiles)](
            grad,
            lse,
            v,
            dx,
            outer * inner,
            n,
            inner,
            grad.stride(0),
            v.stride(0),
            v.stride(1),
            v.stride(2),
            tiles,
            ACC=common.accumulator(x.dtype),
            BLOCK_N=block_n,
            num_warps=4,
        )
    return dx
