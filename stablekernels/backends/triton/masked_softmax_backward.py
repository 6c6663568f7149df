"""Triton masked softmax backward along the last dim (the kernel ``masked_softmax_backward``
of stablekernels.backends.Kernels), from grad and the output y of masked_softmax.py (one
dtype, contiguous) and the forward's float64 lse, in the accumulation dtype:

    softmax:     d = y * (dy - sum(dy * y))      log_softmax: d = dy - exp(y) * sum(dy)
    dx = _masked_gradient(d): scale * d; 0 on a dead row (lse -inf) and, for log_softmax,
         where y is -inf (a dropped element)

rounded once to ``input_dtype``. No mask is read. One program per BLOCK_R rows up to
MAX_BLOCK_N elements (one launch); longer rows in two launches: the chunks' sums
(softmax._bwd_parts_kernel), then each chunk adds its row's part sums itself (in
softmax._sum_parts_kernel's order) and writes dx. Offsets are int64; grids are 1-D.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..._numerics import accumulation_dtype
from . import common
from .common import MAX_BLOCK_N, SPLIT_CHUNK
from .softmax import _bwd_parts_kernel


@triton.jit
def _masked_gradient(d, y, dead, scale, LOG: tl.constexpr):
    """The masked backward's rule on the plain backward d of the output y (the torch
    backend's torch_ref.masked_gradient, the C++ and CUDA kernels' masked_rows.h): scale * d;
    0 on a dead row (``dead``, broadcast) and, for log_softmax, where y is -inf."""
    dx = tl.where(dead, 0.0, d * scale)
    if LOG:
        dx = tl.where(y == -float("inf"), 0.0, dx)
    return dx


@triton.jit
def _masked_bwd_kernel(
    G_ptr,
    Y_ptr,
    LSE_ptr,
    DX_ptr,
    rows,
    n,
    scale: tl.float64,
    LOG: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """BLOCK_R whole rows (n <= BLOCK_N) per program; G, Y, DX contiguous (rows, n)."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_N).to(tl.int64)
    valid = (r < rows)[:, None] & (cols < n)[None, :]
    at = (r * n)[:, None] + cols[None, :]
    g = tl.load(G_ptr + at, mask=valid, other=0.0).to(ACC)
    y = tl.load(Y_ptr + at, mask=valid, other=0.0).to(ACC)
    dead = tl.load(LSE_ptr + r, mask=r < rows, other=0.0) == -float("inf")
    if LOG:
        d = g - tl.exp(y) * tl.sum(g, axis=1)[:, None]
    else:
        d = y * (g - tl.sum(g * y, axis=1)[:, None])
    dx = _masked_gradient(d, y, dead[:, None], tl.full([], scale, ACC), LOG)
    tl.store(DX_ptr + at, dx.to(DX_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _masked_bwd_finish_kernel(
    G_ptr,
    Y_ptr,
    LSE_ptr,
    DX_ptr,
    P_ptr,
    n,
    parts,
    scale: tl.float64,
    LOG: tl.constexpr,
    ACC: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PARTS: tl.constexpr,
):
    """dx of chunk ``part`` of row ``row`` (program row * parts + part): the row's part sums
    added (PARTS at a time, as softmax._sum_parts_kernel adds them), then the chunk."""
    program = tl.program_id(0).to(tl.int64)
    row, part = program // parts, program % parts
    acc_parts = tl.zeros([PARTS], dtype=P_ptr.dtype.element_ty)
    for start in range(0, parts, PARTS):
        k = start + tl.arange(0, PARTS)
        acc_parts += tl.load(P_ptr + row * parts + k, mask=k < parts, other=0.0)
    total = tl.sum(acc_parts, axis=0).to(ACC)
    dead = tl.load(LSE_ptr + row) == -float("inf")
    scale_acc = tl.full([], scale, ACC)
    begin = part * CHUNK
    end = tl.minimum(begin + CHUNK, n)
    for start in range(0, CHUNK, BLOCK_N):
        cols = begin + start + tl.arange(0, BLOCK_N).to(tl.int64)
        valid = cols < end
        at = row * n + cols
        g = tl.load(G_ptr + at, mask=valid, other=0.0).to(ACC)
        y = tl.load(Y_ptr + at, mask=valid, other=0.0).to(ACC)
        if LOG:
            d = g - tl.exp(y) * total
        else:
            d = y * (g - total)
        dx = _masked_gradient(d, y, dead, scale_acc, LOG)
        tl.store(DX_ptr + at, dx.to(DX_ptr.dtype.element_ty), mask=valid)


@triton_op("stablekernels::_triton_masked_softmax_backward", mutates_args={})
def masked_softmax_backward(
    grad: torch.Tensor,
    output: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    log: bool,
    input_dtype: torch.dtype,
) -> torch.Tensor:
    """The masked_softmax_backward kernel of the contract (stablekernels.backends.Kernels).

    grad, output: one floating dtype and shape, contiguous, >= 1-D, non-empty; rows along the
    last dim. lse: float64, contiguous, (rows,), -inf on dead rows. Returns dx, output's
    shape, ``input_dtype``, contiguous: per row 0 where lse is -inf, else scale * (the
    softmax, or log_softmax if ``log``, backward), and for log_softmax 0 where output is -inf.
    One launch for rows up to MAX_BLOCK_N elements, two beyond.
    """
    assert output.dim() >= 1 and output.numel() > 0 and output.is_contiguous()
    assert grad.shape == output.shape and grad.dtype == output.dtype and grad.is_contiguous()
    n = output.shape[-1]
    rows = output.numel() // n
    assert lse.dtype == torch.float64 and lse.shape == (rows,) and lse.is_contiguous()
    dx = torch.empty(output.shape, dtype=input_dtype, device=output.device)
    acc = common.accumulator(output.dtype, input_dtype)
    scale = float(scale)
    with common.on_device(output):
        if n <= MAX_BLOCK_N:
            block_r, block_n, warps = common.launch_shape(n)
            wrap_triton(_masked_bwd_kernel)[common.grid(triton.cdiv(rows, block_r))](
                grad,
                output,
                lse,
                dx,
                rows,
                n,
                scale,
                LOG=log,
                ACC=acc,
                BLOCK_R=block_r,
                BLOCK_N=block_n,
                num_warps=warps,
            )
            return dx
        parts = triton.cdiv(n, SPLIT_CHUNK)
        sum_dtype = accumulation_dtype(output.dtype, input_dtype)
        partial = torch.empty(rows * parts, dtype=sum_dtype, device=output.device)
        wrap_triton(_bwd_parts_kernel)[common.grid(rows * parts)](
            grad,
            output,
            partial,
            n,
            1,
            parts,
            LOG=log,
            ACC=acc,
            CHUNK=SPLIT_CHUNK,
            BLOCK_N=2048,
            num_warps=8,
        )
        wrap_triton(_masked_bwd_finish_kernel)[common.grid(rows * parts)](
            grad,
            output,
            lse,
            dx,
            partial,
            n,
            parts,
            scale,
            LOG=log,
            ACC=acc,
            CHUNK=SPLIT_CHUNK,
            BLOCK_N=2048,
            PARTS=common.PARTS_BLOCK,
            num_warps=8,
        )
    return dx
