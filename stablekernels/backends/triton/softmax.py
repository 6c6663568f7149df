"""Triton softmax and log_softmax, forward and backward.

Forward, for a row x (docs/design.md, Alg. 4.1 of Blanchard, Higham & Higham):

    m = max(x);  s' = sum_{i != argmax} exp(x_i - m)
    softmax_j = exp(x_j - m) / (1 + s')            (IEEE division)
    log_softmax_j = (x_j - m) - log1p(s')

Rows of up to MAX_BLOCK_N elements: one program holds BLOCK_R rows in registers (one read,
one write). Longer rows: the split path, SPLIT_CHUNK elements per program: programs write
their (m, s') to a workspace, then each program merges its row's parts and normalises its
chunk (x read twice).

Backward, with y the forward output:

    softmax:      dx = y * (dy - sum(dy * y))
    log_softmax:  dx = dy - exp(y) * sum(dy)

one read of y and dy and one write of dx per row that fits a program; long rows sum in
parts first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..._numerics import accumulation_dtype
from . import common
from .common import MAX_BLOCK_N, SPLIT_CHUNK


@triton.jit
def _softmax_fwd_kernel(
    X_ptr,
    Y_ptr,
    rows,
    n,
    inner,
    stride_xo,
    stride_xn,
    stride_xi,
    LOG: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    o, i = r // inner, r % inner
    cols = tl.arange(0, BLOCK_N).to(tl.int64)
    valid = (r < rows)[:, None] & (cols < n)[None, :]
    x_at = (o * stride_xo + i * stride_xi)[:, None] + cols[None, :] * stride_xn
    y_at = (o * n * inner + i)[:, None] + cols[None, :] * inner
    x = tl.load(X_ptr + x_at, mask=valid, other=-float("inf")).to(ACC)
    m, s = common.tile_stats(x, valid)
    if LOG:
        y = (x - m[:, None]) - common.log1p(s)[:, None]
    else:
        y = common.divide(tl.exp(x - m[:, None]), (1.0 + s)[:, None], ACC)
    y = common.nan_unless_finite(y, m[:, None])
    tl.store(Y_ptr + y_at, y.to(Y_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _row_parts_kernel(
    X_ptr,
    M_ptr,
    S_ptr,
    n,
    inner,
    stride_xo,
    stride_xn,
    stride_xi,
    parts,
    ACC: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """(m, s') of chunk `part` of row `row`, tile by tile, into the workspace."""
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1).to(tl.int64)
    o, i = row // inner, row % inner
    base = o * stride_xo + i * stride_xi
    begin = part * CHUNK
    end = tl.minimum(begin + CHUNK, n)
    m_run = tl.full([], -float("inf"), ACC)
    s_run = tl.full([], -1.0, ACC)
    for start in range(0, CHUNK, BLOCK_N):
        cols = begin + start + tl.arange(0, BLOCK_N).to(tl.int64)
        valid = cols < end
        x = tl.load(X_ptr + base + cols * stride_xn, mask=valid, other=-float("inf")).to(ACC)
        m_t, s_t = common.tile_stats(x[None, :], valid[None, :])  # one row: shape [1]
        m_run, s_run = common.merge(m_run, s_run, tl.max(m_t, axis=0), tl.max(s_t, axis=0))
    tl.store(M_ptr + row * parts + part, m_run)
    tl.store(S_ptr + row * parts + part, s_run)


@triton.jit
def _row_total(M_ptr, S_ptr, row, parts, PARTS: tl.constexpr):
    k = tl.arange(0, PARTS)
    ms = tl.load(M_ptr + row * parts + k, mask=k < parts, other=-float("inf"))
    ss = tl.load(S_ptr + row * parts + k, mask=k < parts, other=-1.0)
    return common.merge_parts(ms, ss, k)


@triton.jit
def _softmax_finish_kernel(
    X_ptr,
    Y_ptr,
    M_ptr,
    S_ptr,
    n,
    inner,
    stride_xo,
    stride_xn,
    stride_xi,
    parts,
    LOG: tl.constexpr,
    ACC: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PARTS: tl.constexpr,
):
    """Merge the row's parts, then normalise chunk `part` of it."""
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1).to(tl.int64)
    m, s = _row_total(M_ptr, S_ptr, row, parts, PARTS)
    o, i = row // inner, row % inner
    x_base = o * stride_xo + i * stride_xi
    y_base = o * n * inner + i
    begin = part * CHUNK
    end = tl.minimum(begin + CHUNK, n)
    log_sum = common.log1p(s)
    for start in range(0, CHUNK, BLOCK_N):
        cols = begin + start + tl.arange(0, BLOCK_N).to(tl.int64)
        valid = cols < end
        x = tl.load(X_ptr + x_base + cols * stride_xn, mask=valid, other=0.0).to(ACC)
        if LOG:
            y = (x - m) - log_sum
        else:
            y = common.divide(tl.exp(x - m), 1.0 + s, ACC)
        y = common.nan_unless_finite(y, m)
        tl.store(Y_ptr + y_base + cols * inner, y.to(Y_ptr.dtype.element_ty), mask=valid)


def row_parts(v: torch.Tensor, acc, ws_dtype: torch.dtype):
    """(m, s', parts) of the split-row path: the rows of ``v`` (outer, n, inner) cut into
    ``parts`` chunks of SPLIT_CHUNK, one program per (row, chunk); m and s' are flat
    (rows * parts) workspaces of ``ws_dtype``, to be merged by the caller's finish kernel."""
    outer, n, inner = v.shape
    rows = outer * inner
    parts = triton.cdiv(n, SPLIT_CHUNK)
    m_ws = torch.empty(rows * parts, dtype=ws_dtype, device=v.device)
    s_ws = torch.empty(rows * parts, dtype=ws_dtype, device=v.device)
    wrap_triton(_row_parts_kernel)[(rows, parts)](
        v,
        m_ws,
        s_ws,
        n,
        inner,
        v.stride(0),
        v.stride(1),
        v.stride(2),
        parts,
        ACC=acc,
        CHUNK=SPLIT_CHUNK,
        BLOCK_N=2048,
        num_warps=8,
    )
    return m_ws, s_ws, parts


@triton_op("stablekernels::_triton_softmax", mutates_args={})
def forward(x: torch.Tensor, dim: int, dtype: torch.dtype, log: bool) -> torch.Tensor:
    """The softmax kernel of the contract (stablekernels.backends.Kernels.softmax)."""
    v = common.rows_view(x, dim)
    outer, n, inner = v.shape
    rows = outer * inner
    y = torch.empty(x.shape, dtype=dtype, device=x.device)
    acc = common.accumulator(x.dtype, dtype)
    strides = (v.stride(0), v.stride(1), v.stride(2))
    if n <= MAX_BLOCK_N:
        block_r, block_n, warps = common.launch_shape(n)
        grid = (triton.cdiv(rows, block_r),)
        wrap_triton(_softmax_fwd_kernel)[grid](
            v,
            y,
            rows,
            n,
            inner,
            *strides,
            LOG=log,
            ACC=acc,
            BLOCK_R=block_r,
            BLOCK_N=block_n,
            num_warps=warps,
        )
        return y
    m_ws, s_ws, parts = row_parts(v, acc, accumulation_dtype(x.dtype, dtype))
    wrap_triton(_softmax_finish_kernel)[(rows, parts)](
        v,
        y,
        m_ws,
        s_ws,
        n,
        inner,
        *strides,
        parts,
        LOG=log,
        ACC=acc,
        CHUNK=SPLIT_CHUNK,
        BLOCK_N=2048,
        PARTS=triton.next_power_of_2(parts),
        num_warps=8,
    )
    return y


# ---------------------------------------------------------------------------------------
# Backward.


@triton.jit
def _softmax_bwd_kernel(
    G_ptr,
    Y_ptr,
    DX_ptr,
    rows,
    n,
    inner,
    LOG: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """G, Y and DX contiguous (outer, n, inner)."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    o, i = r // inner, r % inner
    cols = tl.arange(0, BLOCK_N).to(tl.int64)
    valid = (r < rows)[:, None] & (cols < n)[None, :]
    at = (o * n * inner + i)[:, None] + cols[None, :] * inner
    g = tl.load(G_ptr + at, mask=valid, other=0.0).to(ACC)
    y = tl.load(Y_ptr + at, mask=valid, other=0.0).to(ACC)
    if LOG:
        dx = g - tl.exp(y) * tl.sum(g, axis=1)[:, None]
    else:
        dx = y * (g - tl.sum(g * y, axis=1)[:, None])
    tl.store(DX_ptr + at, dx.to(DX_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _bwd_parts_kernel(
    G_ptr,
    Y_ptr,
    P_ptr,
    n,
    inner,
    parts,
    LOG: tl.constexpr,
    ACC: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The part `part` of the row's sum(dy * y) (softmax) or sum(dy) (log_softmax)."""
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1).to(tl.int64)
    base = (row // inner) * n * inner + row % inner
    begin = part * CHUNK
    end = tl.minimum(begin + CHUNK, n)
    total = tl.zeros([BLOCK_N], dtype=ACC)
    for start in range(0, CHUNK, BLOCK_N):
        cols = begin + start + tl.arange(0, BLOCK_N).to(tl.int64)
        valid = cols < end
        g = tl.load(G_ptr + base + cols * inner, mask=valid, other=0.0).to(ACC)
        if LOG:
            total += g
        else:
            total += g * tl.load(Y_ptr + base + cols * inner, mask=valid, other=0.0).to(ACC)
    tl.store(P_ptr + row * parts + part, tl.sum(total, axis=0))


@triton.jit
def _bwd_finish_kernel(
    G_ptr,
    Y_ptr,
    DX_ptr,
    P_ptr,
    n,
    inner,
    parts,
    LOG: tl.constexpr,
    ACC: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PARTS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1).to(tl.int64)
    k = tl.arange(0, PARTS)
    total = tl.sum(tl.load(P_ptr + row * parts + k, mask=k < parts, other=0.0), axis=0)
    base = (row // inner) * n * inner + row % inner
    begin = part * CHUNK
    end = tl.minimum(begin + CHUNK, n)
    for start in range(0, CHUNK, BLOCK_N):
        cols = begin + start + tl.arange(0, BLOCK_N).to(tl.int64)
        valid = cols < end
        at = base + cols * inner
        g = tl.load(G_ptr + at, mask=valid, other=0.0).to(ACC)
        y = tl.load(Y_ptr + at, mask=valid, other=0.0).to(ACC)
        if LOG:
            dx = g - tl.exp(y) * total
        else:
            dx = y * (g - total)
        tl.store(DX_ptr + at, dx.to(DX_ptr.dtype.element_ty), mask=valid)


@triton_op("stablekernels::_triton_softmax_backward", mutates_args={})
def backward(
    grad: torch.Tensor, output: torch.Tensor, dim: int, input_dtype: torch.dtype, log: bool
) -> torch.Tensor:
    """The softmax_backward kernel of the contract: grad and output of one dtype, both
    contiguous."""
    y, g = output, grad
    v = common.rows_view(y, dim)
    outer, n, inner = v.shape
    rows = outer * inner
    dx = torch.empty(y.shape, dtype=input_dtype, device=y.device)
    acc = common.accumulator(y.dtype, input_dtype)
    if n <= MAX_BLOCK_N:
        block_r, block_n, warps = common.launch_shape(n)
        wrap_triton(_softmax_bwd_kernel)[(triton.cdiv(rows, block_r),)](
            g,
            y,
            dx,
            rows,
            n,
            inner,
            LOG=log,
            ACC=acc,
            BLOCK_R=block_r,
            BLOCK_N=block_n,
            num_warps=warps,
        )
        return dx
    parts = triton.cdiv(n, SPLIT_CHUNK)
    partial = torch.empty(
        rows * parts, dtype=accumulation_dtype(y.dtype, input_dtype), device=y.device
    )
    grid = (rows, parts)
    wrap_triton(_bwd_parts_kernel)[grid](
        g,
        y,
        partial,
        n,
        inner,
        parts,
        LOG=log,
        ACC=acc,
        CHUNK=SPLIT_CHUNK,
        BLOCK_N=2048,
        num_warps=8,
    )
    wrap_triton(_bwd_finish_kernel)[grid](
        g,
        y,
        dx,
        partial,
        n,
        inner,
        parts,
        LOG=log,
        ACC=acc,
        CHUNK=SPLIT_CHUNK,
        BLOCK_N=2048,
        PARTS=triton.next_power_of_2(parts),
        num_warps=8,
    )
    return dx
