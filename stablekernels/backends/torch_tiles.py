"""The linear cross-entropy's tile epilogues of the ``torch`` backend, in plain PyTorch ops
(the rules and the state's columns: csrc/include/stablekernels/linear_tiles.h, the same in
C++ for the cpp and cuda backends; docs/linear_cross_entropy.md).

A tile is (R, n) raw logits y = x W_k^T + b_k of the classes [class_start, class_start + n),
in the accumulation dtype (fp32, or fp64), contiguous; the logits proper are
``z = softcap * tanh((y / temperature) / softcap)`` (``y / temperature`` without softcap).

:func:`cross_entropy_tile` merges each row of the tile into the row's running state, a
(R, 10) float64 tensor written in place (the tile with class_start 0 initialises it)::

    0 m, 1 s'    the (m, s') of the classes seen (docs/design.md, 1.2)
    2 gaps       sum_c w_c (m - z_c) (label smoothing only), 3 W = sum_c w_c
    4 ent        sum_c exp(z_c - m) (m - z_c) (entropy only), 5 z_t the target's logit
    6 nll = (m - z_t) + log1p(s'),  7 smooth = gaps + W log1p(s'),
    8 lse = finish_lse(m, s'),      9 H = ent / (1 + s') + log1p(s') (NaN where lse is not
                                      finite)

every added term >= 0. :func:`cross_entropy_tile_backward` overwrites the tile with the
gradient along y from the rows' terms (R, 5) = (hi, lo, coef, smooth, one_hot)::

    dz_c = p_c coef - smooth w_c - [c == t] one_hot - g_H p_c ((z_c - hi) - lo),
    p_c = exp((z_c - hi) - lo),   dy_c = dz_c (1 - tanh^2) / temperature

the one-hot term only where the tile holds the row's target.
"""

from __future__ import annotations

import torch

from .._numerics import finish_lse, row_stats
from .torch_ce import _chunks

STATE_FIELDS = 10
"""The columns of a row's running state (module doc)."""


def transform(y: torch.Tensor, softcap: float | None, temperature: float):
    """(z, tanh) of raw logits y: z a new tensor, tanh the softcap's (None without)."""
    z = y / temperature if temperature != 1.0 else y.clone()
    if softcap is None:
        return z, None
    t = torch.tanh(z / softcap)
    return t * softcap, t


def _moved_entropy(ent, m, s, mm):
    """ent of a part with max m moved to the merged max mm (0 where its factor is 0)."""
    f = torch.exp(m - mm)
    moved = torch.where(f == 0, 0.0, f * (ent + (mm - m) * (1 + s)))
    return torch.where(m == mm, ent, moved)


def merge_parts(a, b):
    """The merge of two parts (m, s', gaps, W, ent) of rows (float64 (R,) each): the (m, s')
    rule, each side's sums moved to the merged max."""
    am, as_, ag, aw, ae = a
    bm, bs, bg, bw, be = b
    first = am >= bm
    hi, lo = torch.where(first, am, bm), torch.where(first, bm, am)
    s_hi, s_lo = torch.where(first, as_, bs), torch.where(first, bs, as_)
    s = torch.where(hi == lo, s_hi + s_lo + 1, s_hi + (s_lo + 1) * torch.exp(lo - hi))
    m = torch.where(am.isnan() | bm.isnan(), float("nan"), hi)
    gaps = ag + bg
    gaps = gaps + torch.where((aw > 0) & (m != am), (m - am) * aw, 0.0)
    gaps = gaps + torch.where((bw > 0) & (m != bm), (m - bm) * bw, 0.0)
    ent = _moved_entropy(ae, am, as_, m) + _moved_entropy(be, bm, bs, m)
    return m, s, gaps, aw + bw, ent


def _tile_part(z, weight, smoothing, entropy):
    """The part (m, s', gaps, W, ent) of each row of z (R, n), float64 (R,) each."""
    m, _, e, s = row_stats(z, 1)
    zeros = torch.zeros(z.shape[0], dtype=torch.float64, device=z.device)
    gaps, weights, ent = zeros, zeros, zeros
    if smoothing:
        gap = torch.where(z == float("-inf"), float("inf"), m - z)
        if weight is None:
            gaps, weights = gap.sum(1).double(), zeros + z.shape[1]
        else:
            gaps, weights = (gap * weight).sum(1).double(), zeros + weight.double().sum()
    if entropy:
        ent = torch.where(e > 0, e * (m - z), 0.0).sum(1).double()
        ent = torch.where(m[:, 0].isfinite() & ~s[:, 0].isnan(), ent, 0.0)
    return m[:, 0].double(), s[:, 0].double(), gaps, weights, ent


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
    """Merges each row of the tile ``logits`` (R, n) into ``state`` (R, 10) float64, in
    place (module doc); ``target`` (R,) int64 class indices (the tile holds those in
    [class_start, class_start + n)); ``weight`` None or all (V,) class weights in the
    logits' dtype. ``logits`` is not written."""
    rows, n = logits.shape
    w = None if weight is None else weight[class_start : class_start + n]
    for part in _chunks(rows, n):
        z, _ = transform(logits[part], softcap, temperature)
        local = target[part] - class_start
        held = (local >= 0) & (local < n)
        z_t = z.gather(1, torch.where(held, local, 0)[:, None])[:, 0].double()
        tile = _tile_part(z, w, smoothing, entropy)
        st = state[part]
        if class_start == 0:
            merged, z_t = tile, torch.where(held, z_t, 0.0)
        else:
            merged = merge_parts(tuple(st.unbind(1)[:5]), tile)
            z_t = torch.where(held, z_t, st[:, 5])
        m, s, gaps, weights, ent = merged
        log_rest = torch.log1p(s)
        lse = finish_lse(m, s)
        h = torch.where(lse.isfinite(), ent / (1 + s) + log_rest, float("nan"))
        columns = (m, s, gaps, weights, ent, z_t, (m - z_t) + log_rest,
                   gaps + weights * log_rest, lse, h)  # fmt: skip
        st.copy_(torch.stack(columns, 1))


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
    """Overwrites the tile ``logits`` (R, n) with the gradient along it (module doc), from
    ``terms`` (R, 5) and ``grad_entropy`` (R,) or None, in the logits' dtype; other
    arguments as :func:`cross_entropy_tile`."""
    rows, n = logits.shape
    w = None if weight is None else weight[class_start : class_start + n]
    columns = torch.arange(n, device=logits.device)
    for part in _chunks(rows, n):
        z, t = transform(logits[part], softcap, temperature)
        hi, lo, coef, smooth, one_hot = (c[:, None] for c in terms[part].unbind(1))
        shifted = (z - hi) - lo
        p = torch.exp(shifted)
        dz = p * coef - (smooth if w is None else smooth * w)
        local = (target[part] - class_start)[:, None]
        dz -= torch.where(columns == local, one_hot, 0.0)
        if grad_entropy is not None:
            dz -= torch.where(p > 0, p * shifted, 0.0) * grad_entropy[part, None]
        if t is not None:
            dz *= 1 - t * t
        if temperature != 1.0:
            dz /= temperature
        logits[part] = dz
