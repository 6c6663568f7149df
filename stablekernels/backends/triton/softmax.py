"""Triton softmax and log_softmax, forward and backward.

Forward, for a row x (docs/design.md, Alg. 4.1 of Blanchard, Higham & Higham):

    m = max(x);  s' = sum_{i != argmax} exp(x_i - m)
    softmax_j = exp(x_j - m) / (1 + s')            (IEEE division)
    log_softmax_j = (x_j - m) - log1p(s')

Rows of up to MAX_BLOCK_N elements: one program holds BLOCK_R rows in registers (one read,
one write). Longer rows: the split path, SPLIT_CHUNK elements per program: programs write
their (m, s') to a workspace, one program per row merges its row's parts once, then each
program normalises its chunk (x read twice).

Backward, with y the forward output:

    softmax:      dx = y * (dy - sum(dy * y))
    log_softmax:  dx = dy - exp(y) * sum(dy)

one read of y and dy and one write of dx per row that fits a program; long rows sum in
parts first (each row's parts added once).

Every grid is 1-D (program = row * parts + part on the split path), so no launch meets
CUDA's limit of 65535 on the y and z dimensions; launches run on the tensor's device
(common.on_device).
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
    """(m, s') of chunk `part` of row `row` (program row * parts + part), tile by tile, into
    the workspace."""
    program = tl.program_id(0).to(tl.int64)
    row, part = program // parts, program % parts
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
    tl.store(M_ptr + program, m_run)
    tl.store(S_ptr + program, s_run)


@triton.jit
def _merge_parts_kernel(M_ptr, S_ptr, ROW_M_ptr, ROW_S_ptr, parts, BLOCK: tl.constexpr):
    """Row `row`'s part states merged once into its (m, s'), BLOCK parts at a time."""
    row = tl.program_id(0).to(tl.int64)
    m_run = tl.full([], -float("inf"), ROW_M_ptr.dtype.element_ty)
    s_run = tl.full([], -1.0, ROW_S_ptr.dtype.element_ty)
    for start in range(0, parts, BLOCK):
        k = start + tl.arange(0, BLOCK)
        valid = k < parts
        ms = tl.load(M_ptr + row * parts + k, mask=valid, other=-float("inf"))
        ss = tl.load(S_ptr + row * parts + k, mask=valid, other=-1.0)
        m_block, s_block = common.merge_parts(ms, ss, k)
        m_run, s_run = common.merge(m_run, s_run, m_block, s_block)
    tl.store(ROW_M_ptr + row, m_run)
    tl.store(ROW_S_ptr + row, s_run)


@triton.jit
def _softmax_finish_kernel(
    X_ptr,
    Y_ptr,
    ROW_M_ptr,
    ROW_S_ptr,
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
):
    """Normalise chunk `part` of row `row` (program row * parts + part) by the row's
    merged (m, s')."""
    program = tl.program_id(0).to(tl.int64)
    row, part = program // parts, program % parts
    m = tl.load(ROW_M_ptr + row)
    s = tl.load(ROW_S_ptr + row)
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


def row_states(v: torch.Tensor, acc, ws_dtype: torch.dtype):
    """(m, s', parts) of the split-row path: the rows of ``v`` (outer, n, inner) cut into
    ``parts`` chunks of SPLIT_CHUNK, one program per (row, chunk) writing the chunk's
    (m, s'), then one program per row merging its parts once; m and s' are (rows,)
    tensors of ``ws_dtype``. Call on ``v``'s device (common.on_device)."""
    outer, n, inner = v.shape
    rows = outer * inner
    parts = triton.cdiv(n, SPLIT_CHUNK)
    part_m = torch.empty(rows * parts, dtype=ws_dtype, device=v.device)
    part_s = torch.empty(rows * parts, dtype=ws_dtype, device=v.device)
    wrap_triton(_row_parts_kernel)[common.grid(rows * parts)](
        v,
        part_m,
        part_s,
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
    row_m = torch.empty(rows, dtype=ws_dtype, device=v.device)
    row_s = torch.empty(rows, dtype=ws_dtype, device=v.device)
    wrap_triton(_merge_parts_kernel)[common.grid(rows)](
        part_m, part_s, row_m, row_s, parts, BLOCK=common.PARTS_BLOCK, num_warps=4
    )
    return row_m, row_s, parts


@triton_op("stablekernels::_triton_softmax", mutates_args={})
def forward(x: torch.Tensor, dim: int, dtype: torch.dtype, log: bool) -> torch.Tensor:
    """The softmax kernel of the contract (stablekernels.backends.Kernels.softmax)."""
    v = common.rows_view(x, dim)
    outer, n, inner = v.shape
    rows = outer * inner
    y = torch.empty(x.shape, dtype=dtype, device=x.device)
    acc = common.accumulator(x.dtype, dtype)
    strides = (v.stride(0), v.stride(1), v.stride(2))
    with common.on_device(x):
        if n <= MAX_BLOCK_N:
            block_r, block_n, warps = common.launch_shape(n)
            wrap_triton(_softmax_fwd_kernel)[common.grid(triton.cdiv(rows, block_r))](
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
        row_m, row_s, parts = row_states(v, acc, accumulation_dtype(x.dtype, dtype))
        wrap_triton(_softmax_finish_kernel)[common.grid(rows * parts)](
            v,
            y,
            row_m,
            row_s,
            n,
            inner,
            *strides,
            parts,
            LOG=log,
            ACC=acc,
            CHUNK=SPLIT_CHUNK,
            BLOCK_N=2048,
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
    """Chunk `part` of row `row`'s (program row * parts + part) sum(dy * y) (softmax) or
    sum(dy) (log_softmax)."""
    program = tl.program_id(0).to(tl.int64)
    row, part = program // parts, program % parts
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
    tl.store(P_ptr + program, tl.sum(total, axis=0))


@triton.jit
def _sum_parts_kernel(P_ptr, TOTAL_ptr, parts, BLOCK: tl.constexpr):
    """Row `row`'s part sums added once, BLOCK parts at a time."""
    row = tl.program_id(0).to(tl.int64)
    total = tl.zeros([BLOCK], dtype=TOTAL_ptr.dtype.element_ty)
    for start in range(0, parts, BLOCK):
        k = start + tl.arange(0, BLOCK)
        total += tl.load(P_ptr + row * parts + k, mask=k < parts, other=0.0)
    tl.store(TOTAL_ptr + row, tl.sum(total, axis=0))


@triton.jit
def _bwd_finish_kernel(
    G_ptr,
    Y_ptr,
    DX_ptr,
    TOTAL_ptr,
    n,
    inner,
    parts,
    LOG: tl.constexpr,
    ACC: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    program = tl.program_id(0).to(tl.int64)
    row, part = program // parts, program % parts
    total = tl.load(TOTAL_ptr + row)
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
    with common.on_device(y):
        if n <= MAX_BLOCK_N:
            block_r, block_n, warps = common.launch_shape(n)
            wrap_triton(_softmax_bwd_kernel)[common.grid(triton.cdiv(rows, block_r))](
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
        sum_dtype = accumulation_dtype(y.dtype, input_dtype)
        partial = torch.empty(rows * parts, dtype=sum_dtype, device=y.device)
        wrap_triton(_bwd_parts_kernel)[common.grid(rows * parts)](
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
        total = torch.empty(rows, dtype=sum_dtype, device=y.device)
        wrap_triton(_sum_parts_kernel)[common.grid(rows)](
            partial, total, parts, BLOCK=common.PARTS_BLOCK, num_warps=4
        )
        wrap_triton(_bwd_finish_kernel)[common.grid(rows * parts)](
            g,
            y,
            dx,
            total,
            n,
            inner,
            parts,
            LOG=log,
            ACC=acc,
            CHUNK=SPLIT_CHUNK,
            BLOCK_N=2048,
            num_warps=8,
        )
    return dx
