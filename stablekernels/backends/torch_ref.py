"""The ``torch`` backend: the numerics contract written in plain PyTorch ops.

Runs on every device torch runs on and is the fallback of the automatic backend choice.
It is written for clarity and exactness, not speed: each function makes a few passes over
the input and allocates row-sized temporaries.

Algorithm (Blanchard, Higham & Higham 2021, Alg. 4.1), for one row x along ``dim``::

    a  = max(x)
    s' = sum_{i != k} exp(x_i - a)      one argmax term (exactly 1) left out
    logsumexp   = a + log1p(s')
    softmax_j   = exp(x_j - a) / (1 + s')
    log_softmax = (x_j - a) - log1p(s')

Leaving the max term out and using log1p keeps log_softmax and logsumexp accurate to
relative precision when s' is tiny ([0, -20] gives -2.0611536e-09, not 0): s' is summed
with the argmax term zeroed, never as sum(exp) - 1, which would cancel.

Inputs of fp16/bf16/fp32 are computed in fp32, fp64 in fp64, and rounded once to the output
dtype. Every kernel returns a new contiguous tensor. Callers (``_library``) guarantee
a floating input with at least one dimension, no zero-size dimension, and a wrapped ``dim``.
"""

from __future__ import annotations

import torch


def accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """fp64 if any of ``dtypes`` is fp64, else fp32 (half types never hold intermediates)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _row_stats(xf: torch.Tensor, dim: int, keep_shifted: bool = False):
    """Row statistics of ``xf`` (already in the accumulation dtype) along ``dim``.

    Returns ``(m, shifted, e, s)``: ``m = max`` and ``s = s'`` with ``dim`` kept at size 1,
    ``e = exp(x - m)`` and, if ``keep_shifted``, ``shifted = x - m`` (else None). The
    subtraction is rounded once, and is exact whenever x_j and m are within a factor of 2,
    which covers large common offsets such as 1e6.

    One argmax term is left out of s' by zeroing it in ``e`` for the sum (the other maxima
    of a tie each add exactly 1). Rows with a NaN, a +inf or all -inf have no meaningful
    s'; the callers give them torch's values.
    """
    m, argmax = torch.max(xf, dim=dim, keepdim=True)
    shifted = xf - m
    e = torch.exp(shifted) if keep_shifted else shifted.exp_()
    e.scatter_(dim, argmax, 0.0)
    s = e.sum(dim=dim, keepdim=True)
    e.scatter_(dim, argmax, 1.0)
    return m, (shifted if keep_shifted else None), e, s


def _nan_where_max_not_finite(result: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    # torch's softmax and log_softmax are NaN on every entry of a row with a NaN, a +inf
    # (inf - inf) or nothing but -inf. Such rows are rare: check first and skip the extra
    # pass when there are none.
    bad = ~m.isfinite()
    if bad.any():
        result = result.masked_fill(bad, float("nan"))
    return result


def softmax(x: torch.Tensor, dim: int, out_dtype: torch.dtype) -> torch.Tensor:
    """softmax_j = exp(x_j - max) / (1 + s'), by division (never exp(x - lse))."""
    xf = x.to(accumulation_dtype(x.dtype, out_dtype))
    m, _, e, s = _row_stats(xf, dim)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    return torch.div(_nan_where_max_not_finite(e, m), s.add_(1), out=out)


def log_softmax(x: torch.Tensor, dim: int, out_dtype: torch.dtype) -> torch.Tensor:
    """log_softmax_j = (x_j - max) - log1p(s')."""
    xf = x.to(accumulation_dtype(x.dtype, out_dtype))
    m, shifted, _, s = _row_stats(xf, dim, keep_shifted=True)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    return torch.sub(_nan_where_max_not_finite(shifted, m), s.log1p_(), out=out)


def logsumexp(x: torch.Tensor, dim: int, keepdim: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logsumexp = max + log1p(s'): returned in x.dtype, and in float64 (for the backward)."""
    xf = x.to(accumulation_dtype(x.dtype))
    m, _, _, s = _row_stats(xf, dim)
    lse = m.double() + torch.log1p(s.double())
    # Rows with an infinite max: torch gives -inf (all -inf) and +inf (any +inf, no NaN);
    # here s' is NaN on them. A NaN max stays NaN.
    infinite = m.isinf()
    if infinite.any():
        lse = torch.where(infinite, m.double(), lse)
    if not keepdim:
        lse = lse.squeeze(dim)
    lse = lse.contiguous()
    return lse.to(x.dtype, copy=True), lse


def softmax_backward(
    grad: torch.Tensor, output: torch.Tensor, dim: int, input_dtype: torch.dtype
) -> torch.Tensor:
    """dx = y * (dy - sum(dy * y)), returned in ``input_dtype``."""
    acc = accumulation_dtype(grad.dtype, output.dtype, input_dtype)
    g, y = grad.to(acc), output.to(acc)
    dot = (g * y).sum(dim=dim, keepdim=True)
    out = torch.empty(output.shape, dtype=input_dtype, device=output.device)
    return torch.mul(y, g - dot, out=out)


def log_softmax_backward(
    grad: torch.Tensor, output: torch.Tensor, dim: int, input_dtype: torch.dtype
) -> torch.Tensor:
    """dx = dy - exp(y) * sum(dy), returned in ``input_dtype``."""
    acc = accumulation_dtype(grad.dtype, output.dtype, input_dtype)
    g, y = grad.to(acc), output.to(acc)
    total = g.sum(dim=dim, keepdim=True)
    out = torch.empty(output.shape, dtype=input_dtype, device=output.device)
    return torch.sub(g, torch.exp(y) * total, out=out)


def logsumexp_backward(
    grad: torch.Tensor, x: torch.Tensor, result: torch.Tensor, dim: int, keepdim: bool
) -> torch.Tensor:
    """dx = dy * exp(x - lse), dy and lse broadcast along ``dim``; returned in x.dtype.

    ``result`` is the float64 lse. It is split into hi + lo in the accumulation dtype, and
    x - lse taken as (x - hi) - lo: x - hi is exact for the entries near lse (the ones whose
    gradient is not negligible), so exp(x - lse) keeps its precision at any offset.
    """
    acc = accumulation_dtype(grad.dtype, x.dtype)
    g = grad.to(acc)
    lse = result.double()
    hi = lse.to(acc)
    lo = torch.where(lse.isfinite(), lse - hi.double(), 0.0).to(acc)
    if not keepdim:
        g, hi, lo = g.unsqueeze(dim), hi.unsqueeze(dim), lo.unsqueeze(dim)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return torch.mul(g, torch.exp((x.to(acc) - hi) - lo), out=out)


# Cross-entropy lives in its own module (chunked over rows); re-exported as part of the
# backend's kernel functions.
from .torch_ce import cross_entropy, cross_entropy_backward  # noqa: E402, F401
