"""Cross-entropy kernels of the ``torch`` backend, in plain PyTorch ops, chunked over rows
so that their temporaries stay bounded (about 4M elements, 16 MiB in fp32, per chunk)
whatever the vocabulary.

The forward gives each row's pieces, which the router combines with the options
(docs/design.md), for a row of logits x (C classes), target t, class weights w (all 1
without ``weight``), m = max(x), s' = sum_{i != argmax} exp(x_i - m):

    nll    = (m - x_t) + log1p(s')                          = lse - x_t, both terms >= 0
    smooth = sum_c w_c (m - x_c) + W log1p(s')              = sum_c w_c (lse - x_c)
    lse    = m + log1p(s')

so a confident, correct row keeps its relative precision (logits [0, -20], target 0: nll
2.0611536e-09). The backward is a pure map over the per-row terms (hi, lo, coef, smooth,
one_hot) the router computes:

    dx_c = exp((x_c - hi) - lo) * coef - smooth * w_c - [c == t] * one_hot
"""

from __future__ import annotations

import torch

from .._numerics import accumulation_dtype, finish_lse, row_stats

_CHUNK_ELEMENTS = 1 << 22


def _chunks(rows: int, classes: int):
    step = max(1, _CHUNK_ELEMENTS // max(classes, 1))
    for r0 in range(0, rows, step):
        yield slice(r0, min(rows, r0 + step))


def cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, smoothing: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(nll, smooth, lse) per row, float64, of (R, C) logits and (R,) targets in [0, C);
    ``smooth`` is 0 unless ``smoothing``; ``weight`` is read only for it."""
    rows, classes = logits.shape
    acc = accumulation_dtype(logits.dtype)
    nll = torch.empty(rows, dtype=torch.float64, device=logits.device)
    smooth = torch.zeros(rows, dtype=torch.float64, device=logits.device)
    lse = torch.empty(rows, dtype=torch.float64, device=logits.device)
    w = None if weight is None else weight.to(acc)
    for part in _chunks(rows, classes):
        x = logits[part].to(acc)
        m, _, _, s = row_stats(x, 1)
        log_rest = torch.log1p(s)
        lse[part] = finish_lse(m, s)[:, 0]
        nll[part] = ((m - x.gather(1, target[part, None])) + log_rest)[:, 0].double()
        if smoothing:
            gaps = m - x  # +inf for a -inf logit: torch's smooth term is then inf too
            total = (
                (gaps.sum(1) + classes * log_rest[:, 0])
                if w is None
                else ((gaps * w).sum(1) + w.sum() * log_rest[:, 0])
            )
            smooth[part] = total.double()
    return nll, smooth, lse


def cross_entropy_backward(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, terms: torch.Tensor
) -> torch.Tensor:
    """dx (logits' dtype and shape) from the per-row terms (R, 5) = (hi, lo, coef, smooth,
    one_hot) in the accumulation dtype."""
    rows, classes = logits.shape
    acc = accumulation_dtype(logits.dtype)
    dx = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    w = None if weight is None else weight.to(acc)
    for part in _chunks(rows, classes):
        hi, lo, coef, smooth, one_hot = terms[part].unbind(1)
        d = torch.exp((logits[part].to(acc) - hi[:, None]) - lo[:, None]) * coef[:, None]
        d -= smooth[:, None] if w is None else smooth[:, None] * w
        d.scatter_add_(1, target[part, None], -one_hot[:, None])
        dx[part] = d
    return dx
