"""Triton cross-entropy from logits, the backward: one program per (row, tile), a pure map
over the per-row terms the router gives (``stablekernels::_triton_cross_entropy_backward``)

    dx_c = p_c * coef - smooth * w_c - [c == t] * one_hot,   p_c = exp((x_c - hi) - lo)

or, as the fused kernel of the contract (``stablekernels::_triton_cross_entropy_loss_backward``,
its PROLOGUE flag), deriving each row's terms itself from the loss's gradient, the lse and
the options (csrc/include/stablekernels/cross_entropy_rows.h). The forward and the helpers
both directions share: cross_entropy.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import common
from .cross_entropy import (
    TILE,
    _check_classes,
    _check_host_targets,
    _f64,
    _f64_bits,
    _reduction_code,
    _target,
)


@triton.jit(debug=True)
def _cross_entropy_bwd_kernel(
    X_ptr,
    T_ptr,
    W_ptr,
    TERMS_ptr,
    DX_ptr,
    G_ptr,
    GLSE_ptr,
    LSE_ptr,
    COUNTS_ptr,
    classes,
    stride_x,
    stride_t,
    tiles,
    stride_g,
    stride_glse,
    stride_lse,
    ignore_index,
    e_bits,
    z_bits,
    HAS_WEIGHT: tl.constexpr,
    ACC: tl.constexpr,
    TILE: tl.constexpr,
    PROLOGUE: tl.constexpr,
    REDUCTION: tl.constexpr,
    HAS_GRAD_LSE: tl.constexpr,
    SMOOTH: tl.constexpr,
    HAS_Z: tl.constexpr,
):
    """Tile `tile` of row `row` (program row * tiles + tile).

    Without PROLOGUE: the row's terms from TERMS, (rows, 5) contiguous: hi, lo, coef,
    smooth, one_hot. With PROLOGUE (the fused backward) each program derives them, as
    cross_entropy_rows.h's row_gradient and row_terms, from the loss's gradient G (per row
    at stride_g for "none", REDUCTION 0; one value otherwise), GLSE (HAS_GRAD_LSE), the
    forward's LSE and COUNTS, the target and its weight; a row counts when its target
    != ignore_index (else it reads class 0, with no gradient from the loss)."""
    program = tl.program_id(0).to(tl.int64)
    row, tile = program // tiles, program % tiles
    t, counted = _target(T_ptr, row, stride_t, ignore_index, classes, PROLOGUE)
    if PROLOGUE:
        e = _f64(e_bits)
        if REDUCTION == 0:
            g = tl.load(G_ptr + row * stride_g).to(tl.float64)
        else:
            g = tl.load(G_ptr).to(tl.float64)
        if REDUCTION == 1:
            g_ce = g / tl.load(COUNTS_ptr)
            g_z = g / tl.load(COUNTS_ptr + 1)
        else:
            g_ce = g
            g_z = g
        g_ce = tl.where(counted, g_ce, 0.0)
        g_z = tl.where(counted, g_z, 0.0)
        if HAS_WEIGHT:
            w_t = tl.load(W_ptr + t).to(tl.float64)
        else:
            w_t = tl.full([], 1.0, tl.float64)
        n = tl.cast(classes, tl.int64).to(tl.float64)
        if SMOOTH:
            spread = e * tl.load(COUNTS_ptr + 2) / n
        else:
            spread = tl.full([], 0.0, tl.float64)
        coef = g_ce * ((1.0 - e) * w_t + spread)
        if HAS_GRAD_LSE:
            coef = coef + tl.load(GLSE_ptr + row * stride_glse).to(tl.float64)
        lse = tl.load(LSE_ptr + row * stride_lse).to(tl.float64)
        if HAS_Z:
            coef = coef + (g_z * (2.0 * _f64(z_bits))) * lse
        hi, lo = common.split_lse(lse, ACC)
        coef = coef.to(ACC)
        smooth = ((e / n) * g_ce).to(ACC)
        one_hot = (((1.0 - e) * g_ce) * w_t).to(ACC)
    else:
        terms = TERMS_ptr + row * 5
        hi = tl.load(terms)
        lo = tl.load(terms + 1)
        coef = tl.load(terms + 2)
        smooth = tl.load(terms + 3)
        one_hot = tl.load(terms + 4)
    cols = tile * TILE + tl.arange(0, TILE).to(tl.int64)
    valid = cols < classes
    x = tl.load(X_ptr + row * stride_x + cols, mask=valid, other=0.0).to(ACC)
    p = tl.exp((x - hi) - lo)
    d = p * coef
    if HAS_WEIGHT:
        w = tl.load(W_ptr + cols, mask=valid, other=0.0).to(ACC)
    else:
        w = 1.0
    d -= smooth * w
    d -= tl.where(cols == t, one_hot, 0.0)
    tl.store(DX_ptr + row * classes + cols, d.to(DX_ptr.dtype.element_ty), mask=valid)


def _launch_backward(logits, target, weight, terms=None, loss=None):
    """dx by one launch of _cross_entropy_bwd_kernel: a map of the per-row ``terms``, or
    (``loss``: grad_loss, grad_lse, lse, counts, ignore_index, label_smoothing, z_loss,
    reduction code) the fused backward, which derives each row's terms itself."""
    rows, classes = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    dx = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if loss is None:
        terms = terms.contiguous()
        rows_in = (terms, dx, terms, terms, terms, terms)  # TERMS, DX, G, GLSE, LSE, COUNTS
        scalars = (0, 0, 0, 0, 0, 0)
        flags = {"REDUCTION": 0, "HAS_GRAD_LSE": False, "SMOOTH": False, "HAS_Z": False}
    else:
        grad_loss, grad_lse, lse, counts, ignore_index, label_smoothing, z_loss, code = loss
        rows_in = (dx, dx, grad_loss, lse if grad_lse is None else grad_lse, lse, counts)
        scalars = (
            grad_loss.stride(0) if code == 0 else 0,
            0 if grad_lse is None else grad_lse.stride(0),
            lse.stride(0),
            ignore_index,
            _f64_bits(label_smoothing),
            _f64_bits(z_loss),
        )
        flags = {
            "REDUCTION": code,
            "HAS_GRAD_LSE": grad_lse is not None,
            "SMOOTH": label_smoothing != 0,
            "HAS_Z": z_loss != 0,
        }
    tiles = triton.cdiv(classes, TILE)
    with common.on_device(logits):
        wrap_triton(_cross_entropy_bwd_kernel)[common.grid(rows * tiles)](
            logits,
            target,
            dx if weight is None else weight,
            *rows_in,
            classes,
            logits.stride(0),
            target.stride(0),
            tiles,
            *scalars,
            HAS_WEIGHT=weight is not None,
            ACC=common.accumulator(logits.dtype),
            TILE=TILE,
            PROLOGUE=loss is not None,
            num_warps=4,
            **flags,
        )
    return dx


@triton_op("stablekernels::_triton_cross_entropy_backward", mutates_args={})
def backward(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, terms: torch.Tensor
) -> torch.Tensor:
    """dx from the per-row terms (R, 5) = (hi, lo, coef, smooth, one_hot), contiguous."""
    _check_classes("_triton_cross_entropy_backward", logits.shape[1])
    return _launch_backward(logits, target, weight, terms=terms)


@triton_op("stablekernels::_triton_cross_entropy_loss_backward", mutates_args={})
def cross_entropy_loss_backward(
    grad_loss: torch.Tensor,
    grad_lse: torch.Tensor | None,
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    lse: torch.Tensor,
    counts: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    reduction: str,
) -> torch.Tensor:
    """dx of :func:`cross_entropy_loss` in one launch, contiguous in the logits' dtype, from
    the loss's gradient (per row at any stride for "none", 0-dim otherwise), the lse
    output's gradient (None or (R,) float64 at any stride) and the forward's lse and counts."""
    op = "_triton_cross_entropy_loss_backward"
    code = _reduction_code(op, reduction)
    classes = logits.shape[1]
    _check_classes(op, classes)
    _check_host_targets(target, ignore_index, classes)
    if weight is not None and weight.stride(0) != 1:
        weight = weight.contiguous()
    loss = (grad_loss, grad_lse, lse, counts, ignore_index, label_smoothing, z_loss, code)
    return _launch_backward(logits, target, weight, loss=loss)
