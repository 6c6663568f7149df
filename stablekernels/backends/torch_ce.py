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

import functools

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


# ----------------------------------------------------------------------------------------
# The per-row algebra of csrc/include/stablekernels/cross_entropy_rows.h in torch ops: the
# loss of each row from its pieces and the reduction (the forward's epilogue), and the
# coefficients of dx from the loss's gradient (the backward's prologue). The torch backend's
# fused kernels are these around its own pieces; a backend that gives only the pieces gets
# the same epilogue around its kernels (stablekernels.ops.cross_entropy). Rows: (R,) per-row
# tensors.


def check_targets(target: torch.Tensor, ignore_index: int, classes: int) -> torch.Tensor:
    """Which rows count (target != ignore_index), after checking that every counted target is
    a class: IndexError in torch's words for targets on the host; elsewhere a device-side
    assert (``torch._assert_async``, as torch's nll_loss on CUDA), never a synchronisation."""
    counted = target != ignore_index
    bad = counted & ((target < 0) | (target >= classes))
    if target.device.type == "cpu":
        if bad.any():
            raise IndexError(f"Target {int(target[bad][0])} is out of bounds.")
    else:
        torch._assert_async(~bad.any(), "cross_entropy: a target is out of bounds")
    return counted


def row_loss(nll, smooth, lse, counted, w_t, classes, label_smoothing, z_loss):
    """Each row's loss (fp64) as "none" gives it, from the pieces (nll, smooth, lse: fp64
    rows): ``(1 - e) w_t nll + (e / C) smooth + z lse^2``; NaN where lse is not finite (a
    NaN, a +inf or only -inf, as torch), 0 on rows that do not count. ``w_t``: 1.0 or the
    target's class weight per row."""
    e = label_smoothing
    loss = (1 - e) * w_t * nll
    if e:
        loss = loss + (e / classes) * smooth
    if z_loss:
        loss = loss + z_loss * lse * lse
    loss = torch.where(lse.isfinite(), loss, float("nan"))
    return torch.where(counted, loss, 0.0)


def backward_terms(g_ce, g_z, grad_lse, lse, w_t, total_w, classes, label_smoothing, z_loss, acc):
    """The per-row terms (R, 5) = (hi, lo, coef, smooth, one_hot) in ``acc`` of

        dx_c = exp((x_c - hi) - lo) * coef - smooth * w_c - [c == t] * one_hot

    from the loss's gradient on each row's ce and z terms (g_ce, g_z: fp64, 0 on rows that
    do not count), grad_lse (None or per row), w_t (1.0 or per row) and W (``total_w``):
    coef = g_ce ((1 - e) w_t + e W / C) + g_z 2 z lse + grad_lse, smooth = (e / C) g_ce,
    one_hot = (1 - e) g_ce w_t. Computed in fp64."""
    e = label_smoothing
    rows = lse.shape[0]
    lse = lse.double()
    coef = g_ce * ((1 - e) * w_t + (e * total_w / classes if e else 0.0))
    if grad_lse is not None:
        coef = coef + grad_lse.double()
    if z_loss:
        coef = coef + g_z * (2 * z_loss) * lse
    hi = lse.to(acc)
    lo = torch.where(lse.isfinite(), lse - hi.double(), 0.0).to(acc)
    columns = (coef, (e / classes) * g_ce, (1 - e) * g_ce * w_t)
    return torch.stack([hi, lo, *(c.to(acc).expand(rows) for c in columns)], dim=1)


def per_row_backward_terms(grad_loss, grad_lse, lse, readable, counted, w, classes, e, z, acc):
    """:func:`backward_terms` of per-row losses ("none": g_ce = g_z = grad_loss on counted
    rows), with class weights ``w`` (or None) and the targets ``readable`` by the kernels."""
    g = torch.where(counted, grad_loss.double(), 0.0)
    w_t = 1.0 if w is None else w.double().index_select(0, readable)
    total_w = 0.0 if not e else float(classes) if w is None else w.double().sum()
    return backward_terms(g, g, grad_lse, lse, w_t, total_w, classes, e, z, acc)


def loss_from_pieces(
    pieces, logits, target, weight, ignore_index, label_smoothing, z_loss, reduction
):
    """(loss, lse, counts) of the fused kernel ``cross_entropy_loss`` from a backend's
    ``pieces`` kernel (nll, smooth, lse per row): the loss per row or reduced, in the
    accumulation dtype; lse (R,) fp64; counts = (sum of counted w_t, counted rows, W) fp64,
    W only with label smoothing (0 without: no backward reads it then)."""
    rows, classes = logits.shape
    acc = accumulation_dtype(logits.dtype)
    counted = check_targets(target, ignore_index, classes)
    readable = torch.where(counted, target, 0)
    w = None if weight is None else weight.to(acc)
    nll, smooth, lse = pieces(logits, readable, w, label_smoothing > 0)
    w_t = 1.0 if w is None else w.double().index_select(0, readable)
    counted_w = counted.double() if w is None else torch.where(counted, w_t, 0.0)
    if not label_smoothing:
        total_w = torch.zeros((), dtype=torch.float64, device=lse.device)
    elif w is None:
        total_w = torch.full((), float(classes), dtype=torch.float64, device=lse.device)
    else:
        total_w = w.double().sum()
    counts = torch.stack([counted_w.sum(), counted.sum().double(), total_w])
    if reduction == "mean":
        ce = row_loss(nll, smooth, lse, counted, w_t, classes, label_smoothing, 0.0)
        loss = ce.sum() / counts[0]
        if z_loss:
            kept = torch.where(counted, lse, 0.0)
            loss = loss + z_loss * (kept * kept).sum() / counts[1]
    else:
        loss = row_loss(nll, smooth, lse, counted, w_t, classes, label_smoothing, z_loss)
        if reduction == "sum":
            loss = loss.sum()
    return loss.to(acc), lse, counts


def row_gradients(grad_loss, target, counts, ignore_index, reduction):
    """(g_ce, g_z, counted): the loss's gradient on each row's ce and z terms, fp64, 0 on the
    rows that do not count (cross_entropy_rows.h: "mean" divides by counts[0] and counts[1])."""
    counted = target != ignore_index
    g = grad_loss.double()
    g_ce, g_z = (g / counts[0], g / counts[1]) if reduction == "mean" else (g, g)
    return torch.where(counted, g_ce, 0.0), torch.where(counted, g_z, 0.0), counted


def gradient_from_terms(
    terms_kernel,
    grad_loss,
    grad_lse,
    logits,
    target,
    weight,
    lse,
    counts,
    ignore_index,
    label_smoothing,
    z_loss,
    reduction,
):
    """dx of the fused kernel ``cross_entropy_loss_backward`` through a backend's
    ``terms_kernel`` (the map of the per-row terms (hi, lo, coef, smooth, one_hot))."""
    classes = logits.shape[1]
    acc = accumulation_dtype(logits.dtype)
    g_ce, g_z, counted = row_gradients(grad_loss, target, counts, ignore_index, reduction)
    readable = torch.where(counted, target, 0)
    w = None if weight is None else weight.to(acc)
    w_t = 1.0 if w is None else w.double().index_select(0, readable)
    terms = backward_terms(
        g_ce, g_z, grad_lse, lse, w_t, counts[2], classes, label_smoothing, z_loss, acc
    )
    return terms_kernel(logits, readable, w, terms)


# The torch backend's fused kernels: the epilogue around its own pieces and map (their
# argument names, those of the contract, come from the functions above).
cross_entropy_loss = functools.partial(loss_from_pieces, cross_entropy)
cross_entropy_loss_backward = functools.partial(gradient_from_terms, cross_entropy_backward)
