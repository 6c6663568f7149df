"""Triton linear cross-entropy forward: the logits z = x W^T (+ b, / temperature, softcapped)
made tile by tile with ``tl.dot`` and folded into each row's online (m, s') state in the
matmul's epilogue, never written to memory.

Kernel ``_linear_ce_fwd_kernel``: one program per (block of BLOCK_M rows, vocabulary split);
the 1-D grid holds ``splits * row_blocks`` programs, split-major (program p takes split
``p // row_blocks``, row block ``p % row_blocks``: programs running side by side share their
split's rows of W in the L2 cache). A split is ``split_size`` classes (a multiple of
BLOCK_N; the last split holds the rest). For each BLOCK_N tile of its classes a program

1. accumulates z = x W^T over H in BLOCK_K steps with ``tl.dot``: in float32 for float32,
   float16 and bfloat16 inputs (half operands of one dtype go to the tensor cores as they
   are, their products exact in float32; any other mix is converted to float32 first and
   multiplied with ``input_precision="ieee"``, no TF32), in float64 (``tl.dot`` of float64
   operands) when any of x, W, b is float64;
2. adds the bias, multiplies by 1 / temperature (rounded once on the host; a product per
   logit, as torch's CUDA division by a scalar: within an ulp of the quotient; exact for
   temperature 1), applies ``softcap * tanh(z / softcap)`` (the same way) when a softcap
   is given, and sets the padded columns (past the split's end) to -inf;
3. folds the tile into the rows' (m, s') with ``common.tile_stats`` and ``common.merge``
   (the merge rule of docs/design.md, section 1.2), picks the target's logit where the
   tile holds the row's target, and with label smoothing keeps
   ``gaps = sum_j w_j (m - z_j)`` (each term >= 0), moved by ``W_seen (m_new - m_old)``
   when the max moves (as ``_cross_entropy_fwd_kernel`` does).

It writes, per (row, split) and in float64, what ``kernels.cross_entropy`` gives for the
split's classes: ``lse_k = finish_lse(m, s')``, ``nll_k = (m - z_t) + log1p(s')`` (0 where
the split does not hold the row's target) and ``smooth_k = gaps + W_k log1p(s')``.
:func:`merged_splits` merges the splits in Python in a fixed order (split 0 first),
by the formulas of ``stablekernels._linear_tiles.forward``: no atomics, the same bits run
to run. Row and column offsets are int64.

Memory: the three (rows, splits) float64 parts; no logit is stored. The bias and the class
weights are read in the accumulation dtype, 1 / temperature, softcap and 1 / softcap from a
3-element tensor of it (exact in float64, where a Triton float argument is float32).

Tile sizes (:func:`plan`): 64 x 128 x 64 for fp16/bf16, 64 x 64 x 16 for float32 (FMA
units, as torch.mm in float32 without TF32), 32 x 32 x 32 for float64; every variant is
compiled for sm_80 and sm_90 without spills by tools/gpu_resources.py --check.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..._numerics import accumulation_dtype, merge_lse
from . import common

# Programs a launch aims for (row blocks x splits), so that a few hundred rows still fill
# a GPU. A function of the shapes only: the split, hence every bit of the result, does not
# depend on the device.
TARGET_PROGRAMS = 1024

_HALVES = (torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The launch of one call: tile sizes, warps, stages and register cap, the dot
    operands' dtype, the accumulation dtype, and the vocabulary split (``splits`` splits
    of ``split_size`` classes, the last one the rest)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    maxnreg: int | None
    dot: torch.dtype
    acc: torch.dtype
    splits: int
    split_size: int


def plan(
    rows: int,
    vocab: int,
    input_dtype: torch.dtype,
    weight_dtype: torch.dtype,
    bias_dtype: torch.dtype | None,
    splits: int = 0,
) -> Plan:
    """The :class:`Plan` of a call on ``rows`` x ``vocab`` logits; ``splits`` > 0 asks for
    that many vocabulary splits (fewer when there are fewer BLOCK_N tiles), 0 lets the
    plan pick them (enough row blocks x splits for TARGET_PROGRAMS). A pure function of
    its arguments: :func:`merged_splits` calls it again to merge the parts."""
    dtypes = (input_dtype, weight_dtype) + (() if bias_dtype is None else (bias_dtype,))
    acc = accumulation_dtype(*dtypes)
    # Sizes that compile without spilling for sm_80 and sm_90 with every option
    # (tools/gpu_resources.py --check). The float32 product (FMA, no tensor cores) holds its
    # operands in registers: short BLOCK_K, and ``maxnreg`` 255, without which ptxas at times
    # settles on 128 registers and spills a few bytes; float64 takes small tiles.
    maxnreg = None
    if acc == torch.float64:
        block_m, block_n, block_k, warps, stages = 32, 32, 32, 4, 2
        dot = torch.float64
    elif input_dtype == weight_dtype and input_dtype in _HALVES:
        block_m, block_n, block_k, warps, stages = 64, 128, 64, 8, 3
        dot = input_dtype
    else:
        block_m, block_n, block_k, warps, stages = 64, 64, 16, 8, 2
        dot, maxnreg = torch.float32, 255
    tiles = triton.cdiv(vocab, block_n)
    if splits <= 0:
        splits = triton.cdiv(TARGET_PROGRAMS, triton.cdiv(rows, block_m))
    splits = max(1, min(splits, tiles))
    split_tiles = triton.cdiv(tiles, splits)
    splits = triton.cdiv(tiles, split_tiles)
    return Plan(
        block_m, block_n, block_k, warps, stages, maxnreg, dot, acc, splits, split_tiles * block_n
    )


_TL = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


@triton.jit
def _tanh(y):
    """tanh(y) from e = expm1(-2|y|) as -e / (2 + e): no cancellation near 0 and every
    exponent <= 0 (no overflow); expm1 by Kahan's exp(a) - 1 = (u - 1) a / log(u) with
    u = exp(a) rounded, which cancels u's rounding. A few ulps (float32 ``/`` is Triton's
    fast division, no IEEE slow path); NaN stays NaN, +-inf gives +-1."""
    a = -2.0 * tl.abs(y)
    u = tl.exp(a)
    um1 = u - 1.0
    e = tl.where(u == 1.0, a, tl.where(um1 == -1.0, -1.0, um1 * (a / tl.log(u))))
    t = -e / (2.0 + e)
    return tl.where(y < 0.0, -t, t)


@triton.jit
def _move_gaps(gaps, weight_sum, m_old, m_new):
    """sum_j w_j (m_old - z_j) moved to the max m_new >= m_old: + W (m_new - m_old), added
    only where the max moved and the weights are not 0 (both maxima -inf: m_new - m_old
    would be NaN)."""
    moved = tl.where(m_new != m_old, (m_new - m_old) * weight_sum, 0.0)
    return gaps + tl.where(weight_sum > 0, moved, 0.0)


@triton.jit
def _linear_ce_fwd_kernel(
    X_ptr,
    W_ptr,
    B_ptr,
    CW_ptr,
    T_ptr,
    SCALE_ptr,
    NLL_ptr,
    SMOOTH_ptr,
    LSE_ptr,
    rows,
    vocab,
    hidden,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    row_blocks,
    splits,
    split_size,
    HAS_BIAS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    SMOOTH: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DOT: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Rows [rb * BLOCK_M, +BLOCK_M) over the classes of split ``split`` (module doc).
    SCALE holds (1 / temperature, softcap, 1 / softcap) in ACC; NLL, SMOOTH, LSE are
    (rows, splits) float64, SMOOTH written only with SMOOTH. Targets are in [0, vocab)."""
    program = tl.program_id(0)  # int32 division (the grid is under 2**31); then int64
    split = (program // row_blocks).to(tl.int64)
    r = (program % row_blocks).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = r < rows
    start = split * split_size
    stop = tl.minimum(start + split_size, vocab)
    # every logit is multiplied by the reciprocals (as torch's CUDA division by a scalar
    # does: within an ulp of the quotient), rounded once on the host
    inv_temperature = tl.load(SCALE_ptr)
    softcap = tl.load(SCALE_ptr + 1)
    inv_softcap = tl.load(SCALE_ptr + 2)
    t = tl.load(T_ptr + r, mask=row_ok, other=-1).to(tl.int64)
    j = tl.arange(0, BLOCK_N)  # a column within the tile (int32; addresses are int64)
    kk = tl.arange(0, BLOCK_K).to(tl.int64)
    x_at = X_ptr + r[:, None] * stride_xm + kk[None, :] * stride_xk
    x_step = tl.full([], BLOCK_K, tl.int64) * stride_xk
    w_step = tl.full([], BLOCK_K, tl.int64) * stride_wk
    m = tl.full([BLOCK_M], -float("inf"), ACC)
    s = tl.full([BLOCK_M], -1.0, ACC)
    z_t = tl.zeros([BLOCK_M], ACC)
    gaps = tl.zeros([BLOCK_M], ACC)
    weight_sum = tl.zeros([], ACC)
    for n0 in range(start, stop, BLOCK_N):
        cols = n0 + j.to(tl.int64)
        col_ok = j < stop - n0
        a_at = x_at
        b_at = W_ptr + cols[None, :] * stride_wn + kk[:, None] * stride_wk
        acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
        for k0 in range(0, hidden, BLOCK_K):
            k_ok = kk < hidden - k0
            a = tl.load(a_at, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_at, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if DOT == tl.float16 or DOT == tl.bfloat16:
                acc = tl.dot(a, b, acc, out_dtype=ACC)
            else:  # float32 (no TF32) or float64
                acc = tl.dot(a.to(DOT), b.to(DOT), acc, input_precision="ieee", out_dtype=ACC)
            a_at += x_step
            b_at += w_step
        z = acc
        if HAS_BIAS:
            z += tl.load(B_ptr + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
        z = z * inv_temperature
        if SOFTCAP:
            z = softcap * _tanh(z * inv_softcap)
        valid = col_ok[None, :]
        z = tl.where(valid, z, -float("inf"))
        m_t, s_t = common.tile_stats(z, valid)
        # the row's target as a column of this tile (-1 where the tile does not hold it)
        t_j = tl.where((t >= n0) & (t < n0 + BLOCK_N), t - n0, -1).to(tl.int32)
        z_t += tl.sum(tl.where((j[None, :] == t_j[:, None]) & valid, z, 0.0), axis=1)
        if SMOOTH:
            if HAS_WEIGHT:
                w = tl.load(CW_ptr + cols, mask=col_ok, other=0.0).to(ACC)
            else:
                w = col_ok.to(ACC)
            # a -inf logit has an infinite gap (torch's smooth term is then inf)
            d = tl.where(z == -float("inf"), float("inf"), m_t[:, None] - z)
            gaps_t = tl.sum(tl.where(valid, w[None, :] * d, 0.0), axis=1)
            w_t = tl.sum(w, axis=0)
            m_new = tl.maximum(m, m_t)
            gaps = _move_gaps(gaps, weight_sum, m, m_new) + _move_gaps(gaps_t, w_t, m_t, m_new)
            weight_sum += w_t
        m, s = common.merge(m, s, m_t, s_t)
    log_rest = common.log1p(s)
    out = r * splits + split
    tl.store(LSE_ptr + out, common.finish_lse(m, s), mask=row_ok)
    holds = (t >= start) & (t < stop)
    nll = tl.where(holds, (m - z_t) + log_rest, 0.0)
    tl.store(NLL_ptr + out, nll.to(tl.float64), mask=row_ok)
    if SMOOTH:
        tl.store(SMOOTH_ptr + out, (gaps + weight_sum * log_rest).to(tl.float64), mask=row_ok)


@triton_op("stablekernels::_triton_linear_cross_entropy_parts", mutates_args={})
def parts(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    softcap: float | None,
    temperature: float,
    smoothing: bool,
    splits: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per (row, split) float64 ``(nll_k, smooth_k, lse_k)`` of the logits of ``input``
    (R, H) against ``linear_weight`` (V, H) (any float dtypes, any strides), ``linear_bias``
    (V,) or None, int64 ``target`` (R,) in [0, V), class ``weight`` (V,) or None, over
    the vocabulary splits of :func:`plan` (``splits`` as there: 0 picks them). Each is
    (R, splits) contiguous; ``smooth_k`` is (R, 0) unless ``smoothing``. R, V >= 1."""
    rows, hidden = input.shape
    vocab = linear_weight.shape[0]
    bias_dtype = None if linear_bias is None else linear_bias.dtype
    p = plan(rows, vocab, input.dtype, linear_weight.dtype, bias_dtype, splits)
    f64 = {"dtype": torch.float64, "device": input.device}
    nll = torch.empty(rows, p.splits, **f64)
    smooth = torch.empty(rows, p.splits if smoothing else 0, **f64)
    lse = torch.empty(rows, p.splits, **f64)
    # (1 / temperature, softcap, 1 / softcap) in ACC, each rounded once from float64 (a
    # float argument of a Triton kernel is float32); filled on the device (no copy from the
    # host, no synchronisation)
    cap = 1.0 if softcap is None else softcap
    scale = torch.cat(
        [input.new_full((1,), v, dtype=p.acc) for v in (1.0 / temperature, cap, 1.0 / cap)]
    )
    bias = None if linear_bias is None else linear_bias.contiguous()
    weight = None if weight is None else weight.contiguous()
    row_blocks = triton.cdiv(rows, p.block_m)
    with common.on_device(input):
        wrap_triton(_linear_ce_fwd_kernel)[common.grid(row_blocks * p.splits)](
            input,
            linear_weight,
            bias if bias is not None else scale,
            weight if weight is not None else scale,
            target,
            scale,
            nll,
            smooth if smoothing else nll,
            lse,
            rows,
            vocab,
            hidden,
            input.stride(0),
            input.stride(1),
            linear_weight.stride(0),
            linear_weight.stride(1),
            row_blocks,
            p.splits,
            p.split_size,
            HAS_BIAS=bias is not None,
            HAS_WEIGHT=weight is not None and smoothing,
            SMOOTH=smoothing,
            SOFTCAP=softcap is not None,
            DOT=_TL[p.dot],
            ACC=_TL[p.acc],
            BLOCK_M=p.block_m,
            BLOCK_N=p.block_n,
            BLOCK_K=p.block_k,
            num_warps=p.num_warps,
            num_stages=p.num_stages,
            maxnreg=p.maxnreg,
        )
    return nll, smooth, lse


def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    softcap: float | None,
    temperature: float,
    smoothing: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backend's ``linear_cross_entropy`` kernel (stablekernels.backends.Kernels):
    :func:`merged_splits` with the splits :func:`plan` picks."""
    return merged_splits(
        input, linear_weight, linear_bias, target, weight, softcap, temperature, smoothing, 0
    )


def merged_splits(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    softcap: float | None,
    temperature: float,
    smoothing: bool,
    splits: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row float64 ``(nll, smooth, lse)`` of the logits
    ``softcap * tanh((input W^T + b) / (temperature * softcap))`` (without softcap:
    ``(input W^T + b) / temperature``), the pieces ``kernels.cross_entropy`` gives for the
    whole row of logits (docs/design.md, section 1.8), without the logits in memory.

    input (R, H), linear_weight (V, H), linear_bias (V,) or None: float tensors of any
    dtypes and strides, computed in their accumulation dtype (float32; float64 if any is
    float64). target (R,) int64 in [0, V); weight (V,) class weights in the accumulation
    dtype or None; ``smooth`` is 0 unless ``smoothing``; ``splits`` as :func:`plan`'s (0:
    its choice). R, V >= 1.

    The splits of :func:`parts` merge in a fixed order, as the vocabulary tiles of
    ``stablekernels._linear_tiles.forward``::

        lse    = merge_lse(lse_1, ..., lse_S)
        nll    = (lse - lse_k*) + nll_k*                  k* the split holding the target
        smooth = sum_k smooth_k + W_k (lse - lse_k)       W_k the split's summed weights

    Deterministic: the same bits run to run (no atomics)."""
    nll_k, smooth_k, lse_k = torch.ops.stablekernels._triton_linear_cross_entropy_parts(
        input, linear_weight, linear_bias, target, weight, softcap, temperature, smoothing,
        splits,
    )  # fmt: skip
    vocab = linear_weight.shape[0]
    bias_dtype = None if linear_bias is None else linear_bias.dtype
    p = plan(input.shape[0], vocab, input.dtype, linear_weight.dtype, bias_dtype, splits)
    lse = merge_lse(lse_k, 1)
    owner = torch.div(target, p.split_size, rounding_mode="floor")[:, None]
    nll = (lse - lse_k.gather(1, owner)[:, 0]) + nll_k.gather(1, owner)[:, 0]
    if not smoothing:
        return nll, torch.zeros_like(lse), lse
    if weight is None:
        w = torch.ones(vocab, dtype=torch.float64, device=lse.device)
    else:
        w = weight.double()
    w_k = F.pad(w, (0, p.splits * p.split_size - vocab)).view(p.splits, p.split_size).sum(1)
    smooth = (smooth_k + w_k * (lse[:, None] - lse_k)).sum(1)
    return nll, smooth, lse
