"""Triton cross-entropy from logits, class-index targets.

Forward: one program per row streams the row in tiles, merging each tile's (m, s') into the
row's; with label smoothing it also keeps sum_c w_c (m - x_c), moved to the new max as
a + (m_new - m) W at each merge (every term >= 0). The kernel writes the per-row pieces; the
scalar options (weights of the target, smoothing, z-loss) combine them in fp64 beside the
launch, rows-sized work. Per row (DESIGN.md; torch_ce.py):

    loss = (1 - e) w_t ((m - x_t) + log1p(s')) + (e / C) (sum_c w_c (m - x_c) + W log1p(s'))
           + z lse^2

Backward: one program per (row, tile), a pure map from the saved lse (as hi + lo) and
per-row coefficients computed beside the launch:

    dx_c = p_c * coef - smooth * w_c - [c == t] * one_hot,   p_c = exp((x_c - hi) - lo)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

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
    ignore_index,
    HAS_WEIGHT: tl.constexpr,
    SMOOTH: tl.constexpr,
    ACC: tl.constexpr,
    TILE: tl.constexpr,
):
    """Per row: lse, (m - x_t) + log1p(s') (0 when ignored) and, with smoothing,
    sum_c w_c (m - x_c) + W log1p(s'). The options combine them outside (in fp64)."""
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
            gaps = gaps + tl.where(total_w > 0, (m_new - m) * total_w, 0.0)
            gaps = gaps + gaps_t + tl.where(w_t > 0, (m_new - m_t) * w_t, 0.0)
            total_w = total_w + w_t
        m, s = common.merge(m, s, m_t, s_t)
    log_rest = common.log1p(s)
    m64 = m.to(tl.float64)
    lse = tl.where(tl.abs(m) == float("inf"), m64, m64 + log_rest.to(tl.float64))
    lse = tl.where(s != s, float("nan"), lse)
    tl.store(LSE_ptr + row, lse)
    t = tl.load(T_ptr + row)
    counted = t != ignore_index
    in_range = (t >= 0) & (t < classes)  # an out-of-range target is never read: NaN
    x_t = tl.load(X_ptr + base + tl.where(counted & in_range, t, 0)).to(ACC)
    x_t = tl.where(in_range, x_t, float("nan"))
    finite = (m == m) & (tl.abs(m) != float("inf"))
    nll = tl.where(finite, (m - x_t) + log_rest, float("nan"))
    tl.store(NLL_ptr + row, tl.where(counted, nll, 0.0))
    if SMOOTH:
        smooth = tl.where(finite, gaps + total_w * log_rest, float("nan"))
        tl.store(SMOOTH_ptr + row, tl.where(counted, smooth, 0.0))


def forward(logits, target, weight, ignore_index: int, label_smoothing: float, z_loss: float):
    rows, classes = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    acc = common.workspace_dtype(logits.dtype)
    nll = torch.empty(rows, dtype=acc, device=logits.device)
    smooth = torch.zeros(rows, dtype=acc, device=logits.device)
    lse = torch.empty(rows, dtype=torch.float64, device=logits.device)
    w = None if weight is None else weight.to(acc).contiguous()
    wrap_triton(_cross_entropy_fwd_kernel)[(rows,)](
        logits,
        target,
        w if w is not None else nll,
        nll,
        smooth,
        lse,
        classes,
        logits.stride(0),
        ignore_index,
        HAS_WEIGHT=w is not None,
        SMOOTH=label_smoothing > 0,
        ACC=common.accumulator(logits.dtype),
        TILE=TILE,
        num_warps=8,
    )
    # The options, per row in fp64 (rows-sized work).
    counted = target != ignore_index
    w_t = 1.0 if w is None else w[torch.where(counted, target, 0)].double()
    loss = (1 - label_smoothing) * w_t * nll.double() + label_smoothing / classes * smooth.double()
    if z_loss:
        loss = loss + torch.where(counted, z_loss * lse * lse, 0.0)
    return loss.to(acc), lse


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


def backward(
    grad_loss,
    grad_lse,
    logits,
    target,
    weight,
    lse,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
) -> torch.Tensor:
    rows, classes = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    acc = common.workspace_dtype(logits.dtype)
    counted = target != ignore_index
    t_safe = torch.where(counted, target, 0)
    g = torch.where(counted, grad_loss.double(), 0.0)
    w = None if weight is None else weight.to(acc).contiguous()
    w_t = 1.0 if w is None else w[t_safe].double()
    total_w = float(classes) if w is None else w.double().sum()
    lse64 = lse.double()
    coef = (
        g * ((1 - label_smoothing) * w_t + label_smoothing * total_w / classes + 2 * z_loss * lse64)
        + grad_lse.double()
    )
    hi = lse64.to(acc)
    lo = torch.where(lse64.isfinite(), lse64 - hi.double(), 0.0).to(acc)
    dx = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    wrap_triton(_cross_entropy_bwd_kernel)[(rows, triton.cdiv(classes, TILE))](
        logits,
        target,
        w if w is not None else hi,
        hi,
        lo,
        coef.to(acc),
        (label_smoothing / classes * g).to(acc),
        ((1 - label_smoothing) * g * w_t).to(acc),
        dx,
        classes,
        logits.stride(0),
        HAS_WEIGHT=w is not None,
        ACC=common.accumulator(logits.dtype),
        TILE=TILE,
        num_warps=4,
    )
    return dx
