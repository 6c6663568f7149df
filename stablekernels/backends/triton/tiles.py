"""Triton tile epilogues of the linear cross-entropy (``stablekernels::_triton_cross_entropy_tile``
and ``_triton_cross_entropy_tile_backward``): the rules and the running state's columns of
csrc/include/stablekernels/linear_tiles.h (the torch twin: backends/torch_tiles.py).

The forward is one program per row of the tile: it walks the row in blocks of at most
``BLOCK`` columns, each block's (m, s'), smoothing gaps and entropy sum merged into the
row's running part (in the accumulation dtype), then merges that part into the row's
float64 state (the tile with class_start 0 initialises it) and rewrites the finished
columns (nll, smooth, lse, H). The backward is one program per (row, block of ``BLOCK``
columns), a pure map that overwrites the tile with the gradient along the raw logits. The
logit transform (temperature, softcap) is applied on load: the forward does not write the
tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import common
from .cross_entropy import _f64, _f64_bits
from .linear_cross_entropy import _move_gaps, _tanh

BLOCK = 1024
"""Columns one program takes at a time (forward: per step of its walk; backward: its block)."""


@triton.jit
def _transform(y, temperature, softcap, ACC: tl.constexpr, TEMPERED: tl.constexpr,
               SOFTCAP: tl.constexpr):  # fmt: skip
    """(z, tanh) of raw logits y: z = y / temperature, then softcap * tanh(z / softcap)."""
    z = y
    if TEMPERED:
        z = common.divide(z, temperature, ACC)
    th = z
    if SOFTCAP:
        th = _tanh(common.divide(z, softcap, ACC))
        z = th * softcap
    return z, th


@triton.jit
def _moved_entropy(ent, m, s, mm):
    """ent of a part with max m moved to the merged max mm (0 where its factor is 0)."""
    f = tl.exp(m - mm)
    moved = tl.where(f == 0.0, 0.0, f * (ent + (mm - m) * (1.0 + s)))
    return tl.where(m == mm, ent, moved)


@triton.jit
def _merge_parts(m1, s1, g1, w1, e1, m2, s2, g2, w2, e2):
    """Two parts (m, s', gaps, W, ent) of a row merged (linear_tiles.h: merge_parts)."""
    m, s = common.merge(m1, s1, m2, s2)
    gaps = _move_gaps(g1, w1, m1, m) + _move_gaps(g2, w2, m2, m)
    ent = _moved_entropy(e1, m1, s1, m) + _moved_entropy(e2, m2, s2, m)
    return m, s, gaps, w1 + w2, ent


@triton.jit
def _tile_fwd_kernel(
    Y_ptr,
    T_ptr,
    W_ptr,
    STATE_ptr,
    n,
    class_start,
    temperature_bits,
    softcap_bits,
    HAS_WEIGHT: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    FIRST: tl.constexpr,
    SMOOTH: tl.constexpr,
    ENTROPY: tl.constexpr,
    TEMPERED: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """Row `program` of the tile: its part, merged into STATE (rows, 10) float64."""
    row = tl.program_id(0).to(tl.int64)
    temperature = _f64(temperature_bits).to(ACC)
    softcap = _f64(softcap_bits).to(ACC)
    t = tl.load(T_ptr + row) - class_start
    m = tl.full([], float("-inf"), ACC)
    s = tl.full([], -1.0, ACC)
    gaps = tl.full([], 0.0, ACC)
    weights = tl.full([], 0.0, ACC)
    ent = tl.full([], 0.0, ACC)
    z_t = tl.full([], 0.0, ACC)
    for start in range(0, n, BLOCK):
        cols = start + tl.arange(0, BLOCK).to(tl.int64)
        valid = cols < n
        y = tl.load(Y_ptr + row * n + cols, mask=valid, other=0.0).to(ACC)
        z, _ = _transform(y, temperature, softcap, ACC, TEMPERED, SOFTCAP)
        z = tl.where(valid, z, float("-inf"))
        z_t += tl.sum(tl.where(cols == t, z, 0.0), axis=0)
        bm = tl.max(z, axis=0)
        is_max = (z == bm) & valid
        ex = tl.exp(z - bm)
        rest = tl.sum(tl.where(is_max | (valid == 0), 0.0, ex), axis=0)
        bs = rest + (tl.sum(is_max.to(ACC), axis=0) - 1.0)
        bg = tl.full([], 0.0, ACC)
        bw = tl.full([], 0.0, ACC)
        if SMOOTH:
            if HAS_WEIGHT:
                w = tl.load(W_ptr + class_start + cols, mask=valid, other=0.0).to(ACC)
            else:
                w = valid.to(ACC)
            gap = tl.where(z == float("-inf"), float("inf"), bm - z)
            bg = tl.sum(tl.where(w != 0.0, w * gap, 0.0), axis=0)
            bw = tl.sum(w, axis=0)
        be = tl.full([], 0.0, ACC)
        if ENTROPY:
            finite = (bm == bm) & (tl.abs(bm) != float("inf")) & (bs == bs)
            be = tl.sum(tl.where(valid & (ex > 0.0), ex * (bm - z), 0.0), axis=0)
            be = tl.where(finite, be, 0.0)
        m, s, gaps, weights, ent = _merge_parts(m, s, gaps, weights, ent, bm, bs, bg, bw, be)
    held = (t >= 0) & (t < n)
    st = STATE_ptr + row * 10
    m, s, gaps, weights, ent = (
        m.to(tl.float64), s.to(tl.float64), gaps.to(tl.float64), weights.to(tl.float64),
        ent.to(tl.float64),
    )  # fmt: skip
    if FIRST:
        target = tl.where(held, z_t.to(tl.float64), 0.0)
    else:
        m, s, gaps, weights, ent = _merge_parts(
            tl.load(st), tl.load(st + 1), tl.load(st + 2), tl.load(st + 3), tl.load(st + 4),
            m, s, gaps, weights, ent,
        )  # fmt: skip
        target = tl.where(held, z_t.to(tl.float64), tl.load(st + 5))
    log_rest = common.log1p(s)
    lse = common.finish_lse(m, s)
    finite = (lse == lse) & (tl.abs(lse) != float("inf"))
    tl.store(st, m)
    tl.store(st + 1, s)
    tl.store(st + 2, gaps)
    tl.store(st + 3, weights)
    tl.store(st + 4, ent)
    tl.store(st + 5, target)
    tl.store(st + 6, (m - target) + log_rest)
    tl.store(st + 7, gaps + weights * log_rest)
    tl.store(st + 8, lse)
    tl.store(st + 9, tl.where(finite, ent / (1.0 + s) + log_rest, float("nan")))


@triton.jit
def _tile_bwd_kernel(
    Y_ptr,
    T_ptr,
    W_ptr,
    TERMS_ptr,
    G_ptr,
    n,
    blocks,
    class_start,
    temperature_bits,
    softcap_bits,
    HAS_WEIGHT: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    TEMPERED: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """Block `program % blocks` of row `program // blocks`, overwritten by its gradient."""
    program = tl.program_id(0).to(tl.int64)
    row, block = program // blocks, program % blocks
    temperature = _f64(temperature_bits).to(ACC)
    softcap = _f64(softcap_bits).to(ACC)
    t = tl.load(T_ptr + row) - class_start
    terms = TERMS_ptr + row * 5
    hi = tl.load(terms)
    lo = tl.load(terms + 1)
    coef = tl.load(terms + 2)
    smooth = tl.load(terms + 3)
    one_hot = tl.load(terms + 4)
    cols = block * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    valid = cols < n
    y = tl.load(Y_ptr + row * n + cols, mask=valid, other=0.0).to(ACC)
    z, th = _transform(y, temperature, softcap, ACC, TEMPERED, SOFTCAP)
    shifted = (z - hi) - lo
    p = tl.exp(shifted)
    if HAS_WEIGHT:
        w = tl.load(W_ptr + class_start + cols, mask=valid, other=0.0).to(ACC)
    else:
        w = 1.0
    d = p * coef - smooth * w
    d -= tl.where(cols == t, one_hot, 0.0)
    if HAS_ENTROPY:
        d -= tl.where(p > 0.0, p * shifted, 0.0) * tl.load(G_ptr + row)
    if SOFTCAP:
        d *= 1.0 - th * th
    if TEMPERED:
        d = common.divide(d, temperature, ACC)
    tl.store(Y_ptr + row * n + cols, d, mask=valid)


def _options(logits, softcap, temperature):
    acc = common.accumulator(logits.dtype)
    scalars = (_f64_bits(temperature), _f64_bits(1.0 if softcap is None else softcap))
    flags = {"ACC": acc, "TEMPERED": temperature != 1.0, "SOFTCAP": softcap is not None}
    return scalars, flags


@triton_op("stablekernels::_triton_cross_entropy_tile", mutates_args={"state"})
def cross_entropy_tile(
    logits: torch.Tensor,
    target: torch.Tensor,
    class_start: int,
    weight: torch.Tensor | None,
    softcap: float | None,
    temperature: float,
    smoothing: bool,
    entropy: bool,
    state: torch.Tensor,
) -> None:
    """Each row of the raw tile ``logits`` (R, n) (fp32/fp64, contiguous) merged into
    ``state`` (R, 10) float64 contiguous, in place; ``target`` (R,) int64 contiguous,
    ``weight`` None or all (V,) class weights of the logits' dtype, contiguous. One launch,
    one program per row."""
    rows, n = logits.shape
    if rows == 0:
        return
    scalars, flags = _options(logits, softcap, temperature)
    with common.on_device(logits):
        wrap_triton(_tile_fwd_kernel)[common.grid(rows)](
            logits, target, logits if weight is None else weight, state, n, class_start,
            *scalars, HAS_WEIGHT=weight is not None, BLOCK=min(BLOCK, max(16,
            triton.next_power_of_2(n))), FIRST=class_start == 0, SMOOTH=smoothing,
            ENTROPY=entropy, num_warps=4, **flags,
        )  # fmt: skip


@triton_op("stablekernels::_triton_cross_entropy_tile_backward", mutates_args={"logits"})
def cross_entropy_tile_backward(
    logits: torch.Tensor,
    target: torch.Tensor,
    class_start: int,
    weight: torch.Tensor | None,
    terms: torch.Tensor,
    softcap: float | None,
    temperature: float,
    grad_entropy: torch.Tensor | None,
) -> None:
    """The raw tile ``logits`` (R, n) overwritten by the gradient along it, from ``terms``
    (R, 5) and ``grad_entropy`` (R,) or None (the logits' dtype, contiguous); other
    arguments as :func:`cross_entropy_tile`. One launch, one program per block of a row."""
    rows, n = logits.shape
    if rows == 0:
        return
    scalars, flags = _options(logits, softcap, temperature)
    blocks = triton.cdiv(n, BLOCK)
    with common.on_device(logits):
        wrap_triton(_tile_bwd_kernel)[common.grid(rows * blocks)](
            logits, target, logits if weight is None else weight, terms,
            terms if grad_entropy is None else grad_entropy, n, blocks, class_start, *scalars,
            HAS_WEIGHT=weight is not None, HAS_ENTROPY=grad_entropy is not None, BLOCK=BLOCK,
            num_warps=4, **flags,
        )  # fmt: skip
