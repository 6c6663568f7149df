"""The numerics contract of docs/design.md, written once for Python: the accumulation dtype,
the row statistics (m, s'), the logsumexp that finishes them, and the hi/lo split of a
float64 lse. The torch backend computes with these, the routers of :mod:`stablekernels.ops`
use them for the per-row terms every backend's backward receives, and the Triton backend
takes its dtypes from here (its in-kernel twin of :func:`finish_lse` is
``backends/triton/common.py:finish_lse``, Triton code being a language of its own).

For one row x, with one argmax position k (Blanchard, Higham & Higham 2021, Alg. 4.1)::

    m  = max(x)
    s' = sum_{i != k} exp(x_i - m)        the max term (exactly 1) left out
    logsumexp   = m + log1p(s')
    softmax_j   = exp(x_j - m) / (1 + s')
    log_softmax = (x_j - m) - log1p(s')
"""

from __future__ import annotations

import torch


def accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype every intermediate is held in: float64 if any of ``dtypes`` is float64, else
    float32 (half types never hold intermediates). Results are rounded once from it."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def row_stats(xf: torch.Tensor, dim: int, keep_shifted: bool = False):
    """Row statistics of ``xf`` (already in the accumulation dtype) along ``dim``.

    Returns ``(m, shifted, e, s)``: ``m = max`` and ``s = s'`` with ``dim`` kept at size 1,
    ``e = exp(x - m)`` and, if ``keep_shifted``, ``shifted = x - m`` (else None). The
    subtraction is rounded once, and is exact whenever x_j and m are within a factor of 2,
    which covers large common offsets such as 1e6.

    One argmax term is left out of s' by zeroing it in ``e`` for the sum (the other maxima
    of a tie each add exactly 1), never by computing sum(exp) - 1, which would cancel.
    Special rows end as the merge rule of the C++ kernels leaves them: a row with a NaN has
    m (torch.max propagates it) and s' NaN; a row whose max is +-inf (no NaN) has
    s' = (number of entries equal to the max) - 1, where exp(x - m) would give inf - inf.
    Their ``e`` and ``shifted`` are not meaningful: softmax of such rows is NaN throughout.
    """
    m, argmax = torch.max(xf, dim=dim, keepdim=True)
    shifted = xf - m
    e = torch.exp(shifted) if keep_shifted else shifted.exp_()
    e.scatter_(dim, argmax, 0.0)
    s = e.sum(dim=dim, keepdim=True)
    e.scatter_(dim, argmax, 1.0)
    infinite = m.isinf()
    if infinite.any():  # rare: skip the extra pass otherwise
        ties = (xf == m).sum(dim=dim, keepdim=True).to(s.dtype) - 1
        s = torch.where(infinite, ties, s)
    return m, (shifted if keep_shifted else None), e, s


def finish_lse(m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The float64 logsumexp of row states (m, s'): ``m + log1p(s')``, except that a row
    whose max is infinite has that max as its result (torch: -inf for all -inf, +inf for a
    +inf) and a row with a NaN (s' or m NaN) is NaN."""
    m64, s64 = m.double(), s.double()
    lse = torch.where(m64.isinf(), m64, m64 + torch.log1p(s64))
    return torch.where(s64.isnan(), s64, lse)


def merge_lse(lse: torch.Tensor, dim: int) -> torch.Tensor:
    """The float64 log-sum-exp along ``dim`` of partial log-sum-exps (fp64) of disjoint parts
    of each row (vocabulary tiles, ranks): the partials are a row like any other,
    M + log1p(sum_{k != argmax} exp(lse_k - M)), so a dominant part keeps the small parts'
    precision. ``dim`` is removed."""
    m, _, _, s = row_stats(lse, dim)
    return finish_lse(m, s).squeeze(dim)


def split_lse(lse: torch.Tensor, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A float64 lse as ``hi + lo`` in ``acc``: ``x - lse`` is then taken as
    ``(x - hi) - lo``, where ``x - hi`` is exact for the entries near lse (the ones whose
    gradient is not negligible), so ``exp(x - lse)`` keeps its precision at any offset (a
    float32 lse near 1e6 is off by up to 0.03). ``lo`` is 0 where lse is not finite."""
    lse = lse.double()
    hi = lse.to(acc)
    lo = torch.where(lse.isfinite(), lse - hi.double(), 0.0).to(acc)
    return hi, lo


def probabilities(x: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """p = exp(x - lse) in x's accumulation dtype, taken as ``(x - hi) - lo`` (split_lse),
    with the float64 ``lse`` shaped to broadcast against x (size 1 along the row dim)."""
    acc = accumulation_dtype(x.dtype)
    hi, lo = split_lse(lse, acc)
    return torch.exp((x.to(acc) - hi) - lo)
