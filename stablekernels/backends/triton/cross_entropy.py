"""Triton cross-entropy from logits, class-index targets: the two kernels of the contract
(stablekernels.backends.Kernels), formulas in docs/design.md.

Forward: one program per row streams the row in tiles, merging each tile's (m, s') into the
row's; with label smoothing it also keeps sum_c w_c (m - x_c), moved to the new max as
a + (m_new - m) W at each merge (every term >= 0). It writes the per-row pieces

    nll = (m - x_t) + log1p(s'),  smooth = sum_c w_c (m - x_c) + W log1p(s'),  lse

in float64; the router combines them with the options.

Targets must be in [0, classes): the kernels device_assert it (the CPU router checks it on
the host first). Every grid is 1-D and launches run on the logits' device.

Backward: one program per (row, tile), a pure map over the per-row terms the router gives:

    dx_c = p_c * coef - smooth * w_c - [c == t] * one_hot,   p_c = exp((x_c - hi) - lo)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import common

TILE = 2048


def _check_classes(op: str, classes: int) -> None:
    if classes == 0:
        raise RuntimeError(
            f"{op}: expects logits with at least one class (the stablekernels router guarantees it)"
        )


# debug=True keeps the kernels' device_assert (targets in [0, classes)) in the compiled
# code: a bad target stops the kernel, as torch's nll_loss does, instead of a read outside
# the row; the routers check CPU targets on the host, where that costs no synchronisation.
@triton.jit(debug=True)
def _cross_entropy_fwd_kernel(
    X_ptr,
    T_ptr,
    W_ptr,
    NLL_ptr,
    SMOOTH_ptr,
    LSE_ptr,
    classes,
    stride_x,
    HAS_WEIGHT: tl.constexpr,
    SMOOTH: tl.constexpr,
    ACC: tl.constexpr,
    TILE: tl.constexpr,
):
    """Per row: lse, nll = (m - x_t) + log1p(s') and, with smoothing,
    smooth = sum_c w_c (m - x_c) + W log1p(s'); targets are in [0, classes)."""
    row = tl.program_id(0).to(tl.int64)
    base = row * stride_x
    m = tl.full([], -float("inf"), ACC)
    s = tl.full([], -1.0, ACC)
    gaps = tl.full([], 0.0, ACC)
    total_w = tl.full([], 0.0, ACC)
    for start in range(0, classes, TILE):
        cols = start + tl.arange(0, TILE).to(tl.int64)
        valid = cols < classes
        x = tl.load(X_ptr + base + cols, mask=valid, other=-float("inf")).to(ACC)
        m_t, s_t = common.tile_stats(x[None, :], valid[None, :])
        m_t = tl.max(m_t, axis=0)
        s_t = tl.max(s_t, axis=0)
        if SMOOTH:
            if HAS_WEIGHT:
                w = tl.load(W_ptr + cols, mask=valid, other=0.0).to(ACC)
            else:
                w = valid.to(ACC)
            # a -inf logit has an infinite gap (torch's smooth term is then inf)
            d = tl.where(x == -float("inf"), float("inf"), m_t - x)
            gaps_t = tl.sum(tl.where(valid, w * d, 0.0), axis=0)
            w_t = tl.sum(w, axis=0)
            m_new = tl.maximum(m, m_t)
            # Move both sums to the new max; a side already at it moves by nothing (also when
            # both maxima are -inf, where m_new - m would be NaN).
            gaps = gaps + tl.where((total_w > 0) & (m_new != m), (m_new - m) * total_w, 0.0)
            gaps = gaps + gaps_t + tl.where((w_t > 0) & (m_new != m_t), (m_new - m_t) * w_t, 0.0)
            total_w = total_w + w_t
        m, s = common.merge(m, s, m_t, s_t)
    log_rest = common.log1p(s)
    tl.store(LSE_ptr + row, common.finish_lse(m, s))
    t = tl.load(T_ptr + row)
    tl.device_assert((t >= 0) & (t < classes), "cross_entropy: target out of bounds")
    x_t = tl.load(X_ptr + base + t).to(ACC)
    tl.store(NLL_ptr + row, ((m - x_t) + log_rest).to(tl.float64))
    if SMOOTH:
        tl.store(SMOOTH_ptr + row, (gaps + total_w * log_rest).to(tl.float64))


@triton_op("stablekernels::_triton_cross_entropy", mutates_args={})
def forward(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, smoothing: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(nll, smooth, lse) per row, float64; ``smooth`` is 0 unless ``smoothing``."""
    rows, classes = logits.shape
    _check_classes("_triton_cross_entropy", classes)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    nll = torch.empty(rows, dtype=torch.float64, device=logits.device)
    smooth = torch.zeros(rows, dtype=torch.float64, device=logits.device)
    lse = torch.empty(rows, dtype=torch.float64, device=logits.device)
    with common.on_device(logits):
        wrap_triton(_cross_entropy_fwd_kernel)[common.grid(rows)](
            logits,
            target,
            weight if weight is not None else nll,
            nll,
            smooth,
            lse,
            classes,
            logits.stride(0),
            HAS_WEIGHT=weight is not None,
            SMOOTH=smoothing,
            ACC=common.accumulator(logits.dtype),
            TILE=TILE,
            num_warps=8,
        )
    return nll, smooth, lse


@triton.jit(debug=True)
def _cross_entropy_bwd_kernel(
    X_ptr,
    T_ptr,
    W_ptr,
    TERMS_ptr,
    DX_ptr,
    classes,
    stride_x,
    tiles,
    HAS_WEIGHT: tl.constexpr,
    ACC: tl.constexpr,
    TILE: tl.constexpr,
):
    """Tile `tile` of row `row` (program row * tiles + tile); TERMS is (rows, 5)
    contiguous: hi, lo, coef, smooth, one_hot."""
    program = tl.program_id(0).to(tl.int64)
    row, tile = program // tiles, program % tiles
    t = tl.load(T_ptr + row)
    tl.device_assert((t >= 0) & (t < classes), "cross_entropy: target out of bounds")
    terms = TERMS_ptr + row * 5
    cols = tile * TILE + tl.arange(0, TILE).to(tl.int64)
    valid = cols < classes
    x = tl.load(X_ptr + row * stride_x + cols, mask=valid, other=0.0).to(ACC)
    p = tl.exp((x - tl.load(terms)) - tl.load(terms + 1))
    d = p * tl.load(terms + 2)
    if HAS_WEIGHT:
        w = tl.load(W_ptr + cols, mask=valid, other=0.0).to(ACC)
    else:
        w = 1.0
    d -= tl.load(terms + 3) * w
    d -= tl.where(cols == t, tl.load(terms + 4), 0.0)
    tl.store(DX_ptr + row * classes + cols, d.to(DX_ptr.dtype.element_ty), mask=valid)


@triton_op("stablekernels::_triton_cross_entropy_backward", mutates_args={})
def backward(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, terms: torch.Tensor
) -> torch.Tensor:
    """dx from the per-row terms (R, 5) = (hi, lo, coef, smooth, one_hot), contiguous."""
    rows, classes = logits.shape
    _check_classes("_triton_cross_entropy_backward", classes)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    terms = terms.contiguous()
    dx = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    tiles = triton.cdiv(classes, TILE)
    with common.on_device(logits):
        wrap_triton(_cross_entropy_bwd_kernel)[common.grid(rows * tiles)](
            logits,
            target,
            weight if weight is not None else terms,
            terms,
            dx,
            classes,
            logits.stride(0),
            tiles,
            HAS_WEIGHT=weight is not None,
            ACC=common.accumulator(logits.dtype),
            TILE=TILE,
            num_warps=4,
        )
    return dx
