"""The ``torch`` backend: the numerics contract (docs/design.md) in plain PyTorch ops.

Runs on every device torch runs on and is the fallback of the automatic backend choice.
It is written for clarity and exactness, not speed: each function makes a few passes over
the input and allocates row-sized temporaries. The (m, s') statistics, the finishing
logsumexp and the accumulation dtype come from :mod:`stablekernels._numerics`; the
cross-entropy kernels are in :mod:`.torch_ce`. Preconditions as in
:mod:`stablekernels.backends` (the routers establish them).
"""

from __future__ import annotations

import torch

from .._masked import MaskedMode, MaskedRows
from .._numerics import accumulation_dtype, finish_lse, row_stats, split_lse
from . import Kernels, torch_tiles
from .torch_ce import (
    cross_entropy,
    cross_entropy_backward,
    cross_entropy_loss,
    cross_entropy_loss_backward,
)


def _nan_where_max_not_finite(result: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    # torch's softmax and log_softmax are NaN on every entry of a row with a NaN, a +inf
    # (inf - inf) or nothing but -inf. Such rows are rare: check first and skip the extra
    # pass when there are none.
    bad = ~m.isfinite()
    if bad.any():
        result = result.masked_fill(bad, float("nan"))
    return result


def softmax(x: torch.Tensor, dim: int, dtype: torch.dtype, log: bool) -> torch.Tensor:
    """softmax_j = exp(x_j - m) / (1 + s') (by division, never exp(x - lse)), or, if
    ``log``, log_softmax_j = (x_j - m) - log1p(s'); in ``dtype``."""
    xf = x.to(accumulation_dtype(x.dtype, dtype))
    m, shifted, e, s = row_stats(xf, dim, keep_shifted=log)
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    if log:
        return torch.sub(_nan_where_max_not_finite(shifted, m), s.log1p_(), out=out)
    return torch.div(_nan_where_max_not_finite(e, m), s.add_(1), out=out)


def logsumexp(x: torch.Tensor, dim: int, keepdim: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logsumexp = m + log1p(s'): returned in x.dtype, and in float64 (for the backward)."""
    m, _, _, s = row_stats(x.to(accumulation_dtype(x.dtype)), dim)
    lse = finish_lse(m, s)
    if not keepdim:
        lse = lse.squeeze(dim)
    lse = lse.contiguous()
    return lse.to(x.dtype, copy=True), lse


def softmax_backward(
    grad: torch.Tensor, output: torch.Tensor, dim: int, input_dtype: torch.dtype, log: bool
) -> torch.Tensor:
    """softmax: dx = y * (dy - sum(dy * y)); log_softmax: dx = dy - exp(y) * sum(dy);
    returned in ``input_dtype``."""
    acc = accumulation_dtype(output.dtype, input_dtype)
    g, y = grad.to(acc), output.to(acc)
    out = torch.empty(output.shape, dtype=input_dtype, device=output.device)
    if log:
        return torch.sub(g, torch.exp(y) * g.sum(dim=dim, keepdim=True), out=out)
    return torch.mul(y, g - (g * y).sum(dim=dim, keepdim=True), out=out)


def logsumexp_backward(
    grad: torch.Tensor, x: torch.Tensor, lse: torch.Tensor, dim: int
) -> torch.Tensor:
    """dx = dy * exp(x - lse), taken as (x - hi) - lo (split_lse), with the per-row dy (x's
    dtype, flat in row order, any stride) and the fp64 lse broadcast along ``dim``; returned
    in x.dtype."""
    acc = accumulation_dtype(x.dtype)
    row_shape = list(x.shape)
    row_shape[dim] = 1
    hi, lo = split_lse(lse, acc)
    g, hi, lo = (t.reshape(row_shape) for t in (grad.to(acc), hi, lo))
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return torch.mul(g, torch.exp((x.to(acc) - hi) - lo), out=out)


def masked_softmax(
    x: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    causal_offset: int | None,
    dtype: torch.dtype,
    mode: int,
    masked_rows: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Of t = scale * x + mask along the last dim, with -inf where a bool mask is False or,
    causally, where j > (row's query index) + causal_offset, by ``mode`` (a MaskedMode):
    softmax, log_softmax (x's shape), nothing (STATISTICS: y empty (0,)) or the logsumexp
    (LOGSUMEXP: (rows,)), in ``dtype``; and the float64 lse of each row, (rows,). A row with
    nothing kept ("dead") has lse -inf and y 0 / -inf / -inf, or NaN throughout where
    ``masked_rows`` is MaskedRows.NAN. docs/masked_softmax.md."""
    mode = MaskedMode(mode)
    acc = accumulation_dtype(x.dtype, dtype)
    t = x.to(acc) * scale
    if mask is not None:
        t = t.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else t + mask
    if causal_offset is not None:
        n, queries = x.shape[-1], x.shape[-2] if x.dim() >= 2 else 1
        j = torch.arange(n, device=x.device)
        i = torch.arange(queries, device=x.device)[:, None]
        t = t.masked_fill(j > i + causal_offset, float("-inf"))
    m, shifted, e, s = row_stats(t, -1, keep_shifted=mode == MaskedMode.LOG_SOFTMAX)
    lse = finish_lse(m, s)
    dead = (m == float("-inf")) & ~s.isnan()
    rows = lse.reshape(-1)
    nan_rows = MaskedRows(masked_rows) == MaskedRows.NAN
    if mode == MaskedMode.STATISTICS:
        return torch.empty(0, dtype=dtype, device=x.device), rows
    if mode == MaskedMode.LOGSUMEXP:
        out = torch.where(dead, float("nan"), lse) if nan_rows else lse
        return out.reshape(-1).to(dtype), rows
    if mode == MaskedMode.LOG_SOFTMAX:
        y = _nan_where_max_not_finite(shifted, m) - s.log1p()
        fill = float("-inf")
    else:
        y = _nan_where_max_not_finite(e, m) / (s + 1)
        fill = 0.0
    return torch.where(dead, float("nan") if nan_rows else fill, y).to(dtype), rows


def masked_gradient(
    d: torch.Tensor, y: torch.Tensor, lse: torch.Tensor, scale: float, log: bool
) -> torch.Tensor:
    """The masked backward's rule (the C++ and CUDA kernels': stablekernels/masked_rows.h;
    Triton's: backends/triton/masked_softmax.py) on the plain backward ``d`` of the output
    ``y`` (both (rows, n), accumulation dtype) and the rows' float64 ``lse`` ((rows,)):
    ``scale * d``, 0 on a row whose lse is -inf (nothing kept) and, for log_softmax, 0 where
    y is -inf (a dropped element)."""
    drop = (lse == float("-inf")).unsqueeze(-1)
    if log:
        drop = drop | (y == float("-inf"))
    return torch.where(drop, 0.0, d * scale)


def masked_softmax_backward(
    grad: torch.Tensor,
    output: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    log: bool,
    input_dtype: torch.dtype,
) -> torch.Tensor:
    """dx of the masked softmax (log_softmax if ``log``) along the last dim: the plain
    backward of softmax_backward, then masked_gradient; grad and output of one dtype and
    shape, contiguous, >= 1-D; lse float64, (rows,); returned in ``input_dtype``."""
    acc = accumulation_dtype(output.dtype, input_dtype)
    n = output.shape[-1]
    g, y = grad.to(acc).reshape(-1, n), output.to(acc).reshape(-1, n)
    if log:
        d = g - torch.exp(y) * g.sum(dim=-1, keepdim=True)
    else:
        d = y * (g - (g * y).sum(dim=-1, keepdim=True))
    dx = masked_gradient(d, y, lse.reshape(-1), scale, log)
    return dx.to(input_dtype).reshape(output.shape)


KERNELS = Kernels(
    softmax=softmax,
    softmax_backward=softmax_backward,
    logsumexp=logsumexp,
    logsumexp_backward=logsumexp_backward,
    cross_entropy=cross_entropy,
    cross_entropy_backward=cross_entropy_backward,
    cross_entropy_loss=cross_entropy_loss,
    cross_entropy_loss_backward=cross_entropy_loss_backward,
    masked_softmax=masked_softmax,
    cross_entropy_tile=torch_tiles.cross_entropy_tile,
    cross_entropy_tile_backward=torch_tiles.cross_entropy_tile_backward,
    masked_softmax_backward=masked_softmax_backward,
)
