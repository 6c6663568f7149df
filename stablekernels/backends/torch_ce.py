"""Cross-entropy of the ``torch`` backend, in plain PyTorch ops, chunked over rows so that
its temporaries stay bounded (about 4M elements, 16 MiB in fp32, per chunk) whatever the
vocabulary.

For a row of logits x (C classes), target t, class weights w (all 1 without ``weight``),
smoothing e and z-loss z, with m = max(x), s' = sum_{i != argmax} exp(x_i - m) and
lse = m + log1p(s'):

    loss = (1 - e) * w_t * (lse - x_t) + (e / C) * sum_c w_c (lse - x_c) + z * lse**2

where lse - x_c is computed as (m - x_c) + log1p(s'): both terms >= 0, so a confident,
correct row's loss keeps its relative precision (logits [0, -20], target 0: 2.0611536e-09).
Ignored rows (t == ignore_index) have loss 0. The gradient, from the saved lse:

    dx_c = g * (p_c * ((1 - e) w_t + e W / C + 2 z lse) - (1 - e) w_t [c == t] - (e / C) w_c)
           + g_lse * p_c,      p_c = exp(x_c - lse),  W = sum_c w_c
"""

from __future__ import annotations

import torch

from .torch_ref import _row_stats, accumulation_dtype

_CHUNK_ELEMENTS = 1 << 22


def _chunks(rows: int, classes: int):
    step = max(1, _CHUNK_ELEMENTS // max(classes, 1))
    for r0 in range(0, rows, step):
        yield slice(r0, min(rows, r0 + step))


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row losses (fp32, fp64 for fp64 logits) and lse (fp64) of (R, C) logits and (R,)
    class targets."""
    rows, classes = logits.shape
    acc = accumulation_dtype(logits.dtype)
    loss = torch.empty(rows, dtype=acc, device=logits.device)
    lse = torch.empty(rows, dtype=torch.float64, device=logits.device)
    w = None if weight is None else weight.to(acc)
    for part in _chunks(rows, classes):
        x = logits[part].to(acc)
        t = target[part]
        counted = t != ignore_index
        t_safe = torch.where(counted, t, 0)
        m, _, _, s = _row_stats(x, 1)
        log_rest = torch.log1p(s)
        finite = m.isfinite()
        # lse: an infinite max is the result (torch: -inf for all -inf, +inf for a +inf).
        lse[part] = torch.where(finite, m.double() + log_rest.double(), m.double())[:, 0]
        # lse - x_t, both terms >= 0; rows whose max is not finite are NaN, as in torch.
        nll = ((m - x.gather(1, t_safe[:, None])) + log_rest)[:, 0]
        w_t = 1.0 if w is None else w[t_safe]
        row = (1 - label_smoothing) * w_t * nll
        if label_smoothing:
            diffs = m - x
            smooth = (diffs.sum(1) if w is None else (diffs * w).sum(1)) + (
                classes if w is None else w.sum()
            ) * log_rest[:, 0]
            row = row + (label_smoothing / classes) * smooth
        if z_loss:
            row = row + z_loss * lse[part].to(acc) ** 2
        row = torch.where(finite[:, 0], row, float("nan"))
        loss[part] = torch.where(counted, row, 0.0)
    return loss, lse


def cross_entropy_backward(
    grad_loss: torch.Tensor,
    grad_lse: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    lse: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
) -> torch.Tensor:
    """dx (logits' dtype and shape) from the upstream gradients of the per-row losses and
    of the per-row lse."""
    rows, classes = logits.shape
    acc = accumulation_dtype(logits.dtype)
    dx = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    w = None if weight is None else weight.to(acc)
    total_w = classes if w is None else w.sum()
    for part in _chunks(rows, classes):
        x = logits[part].to(acc)
        t = target[part]
        counted = t != ignore_index
        t_safe = torch.where(counted, t, 0)
        g = torch.where(counted, grad_loss[part].to(acc), 0.0)
        lse_part = lse[part]
        # p = exp(x - lse), with lse split into hi + lo (x - hi exact near lse).
        hi = lse_part.to(acc)
        lo = torch.where(lse_part.isfinite(), lse_part - hi.double(), 0.0).to(acc)
        p = torch.exp((x - hi[:, None]) - lo[:, None])
        w_t = 1.0 if w is None else w[t_safe]
        coef = g * (
            (1 - label_smoothing) * w_t + label_smoothing * total_w / classes + 2 * z_loss * hi
        ) + grad_lse[part].to(acc)
        d = p * coef[:, None]
        d.scatter_add_(1, t_safe[:, None], (-(1 - label_smoothing) * g * w_t)[:, None])
        if label_smoothing:
            smooth = (label_smoothing / classes) * g[:, None]
            d -= smooth if w is None else smooth * w
        dx[part] = d
    return dx
