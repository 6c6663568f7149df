"""Triton cross-entropy from logits, class-index targets: the two kernels of the contract
(stablekernels.backends.Kernels), formulas in docs/design.md.

Forward: one program per row streams the row in tiles, merging each tile's (m, s') into the
row's; with label smoothing it also keeps sum_c w_c (m - x_c), moved to the new max as
a + (m_new - m) W at each merge (every term >= 0). It writes the per-row pieces

    nll = (m - x_t) + log1p(s'),  smooth = sum_c w_c (m - x_c) + W log1p(s'),  lse

in float64; the router combines them with the options.

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


@triton.jit
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
    x_t = tl.load(X_ptr + base + tl.load(T_ptr + row)).to(ACC)
    tl.store(NLL_ptr + row, ((m - x_t) + log_rest).to(tl.float64))
    if SMOOTH:
        tl.store(SMOOTH_ptr + row, (gaps + total_w * log_rest).to(tl.float64))


@triton_op("stablekernels::_triton_cross_entropy", mutates_args={})
def forward(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, smoothing: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(nll, smooth, lse) per row, float64; ``smooth`` is 0 unless ``smoothing``."""
    rows, classes = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    nll = torch.empty(rows, dtype=torch.float64, device=logits.device)
    smooth = torch.zeros(rows, dtype=torch.float64, device=logits.device)
    lse = torch.empty(rows, dtype=torch.float64, device=logits.device)
    wrap_triton(_cross_entropy_fwd_kernel)[(rows,)](
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


@triton.jit
def _cross_entropy_bwd_kernel(
    X_ptr,
    T_ptr,
    W_ptr,
    HI_ptr,
    LO_ptr,
    COEF_ptr,
    SMOOTH_ptr,
    ONE_HOT_ptr,
    DX_ptr,
    classes,
    stride_x,
    HAS_WEIGHT: tl.constexpr,
    ACC: tl.constexpr,
    TILE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * TILE + tl.arange(0, TILE).to(tl.int64)
    valid = cols < classes
    x = tl.load(X_ptr + row * stride_x + cols, mask=valid, other=0.0).to(ACC)
    p = tl.exp((x - tl.load(HI_ptr + row)) - tl.load(LO_ptr + row))
    d = p * tl.load(COEF_ptr + row)
    if HAS_WEIGHT:
        w = tl.load(W_ptr + cols, mask=valid, other=0.0).to(ACC)
    else:
        w = 1.0
    d -= tl.load(SMOOTH_ptr + row) * w
    d -= tl.where(cols == tl.load(T_ptr + row), tl.load(ONE_HOT_ptr + row), 0.0)
    tl.store(DX_ptr + row * classes + cols, d.to(DX_ptr.dtype.element_ty), mask=valid)


@triton_op("stablekernels::_triton_cross_entropy_backward", mutates_args={})
def backward(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, terms: torch.Tensor
) -> torch.Tensor:
    """dx from the per-row terms (R, 5) = (hi, lo, coef, smooth, one_hot)."""
    rows, classes = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    hi, lo, coef, smooth, one_hot = (t.contiguous() for t in terms.unbind(1))
    dx = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    wrap_triton(_cross_entropy_bwd_kernel)[(rows, triton.cdiv(classes, TILE))](
        logits,
        target,
        weight if weight is not None else hi,
        hi,
        lo,
        coef,
        smooth,
        one_hot,
        dx,
        classes,
        logits.stride(0),
        HAS_WEIGHT=weight is not None,
        ACC=common.accumulator(logits.dtype),
        TILE=TILE,
        num_warps=4,
    )
    return dx
