"""The masked kernels' enums, defined once for the routers (stablekernels/ops/masked_softmax.py)
and every backend's kernels (torch_ref.py, backends/triton/masked_softmax.py, and as int
arguments of the extension's ``_fused_masked_softmax``, whose C++ twins are the ``enum class``
es of csrc/include/stablekernels/masked_rows.h: the values must match).
"""

from __future__ import annotations

import enum


class MaskedMode(enum.IntEnum):
    """What the masked forward kernel computes of ``t = scale * x + mask``, row by row
    (docs/masked_softmax.md): its ``mode`` argument."""

    SOFTMAX = 0
    """y = softmax(t), x's shape, in ``dtype``."""
    LOG_SOFTMAX = 1
    """y = log_softmax(t), x's shape, in ``dtype``."""
    STATISTICS = 2
    """the float64 lse only; y is an empty (0,) tensor of ``dtype``."""
    LOGSUMEXP = 3
    """y = the lse of each row, (rows,) in ``dtype`` (a dead row per ``masked_rows``)."""


class MaskedRows(enum.IntEnum):
    """What a row with nothing kept (every t_j = -inf, "dead") gives: the public argument
    ``masked_rows`` ("zero" / "nan") of sk.softmax, log_softmax and logsumexp, as the ops and
    kernels take it. The float64 lse of a dead row is -inf either way (the backward finds
    those rows there), and its gradient is 0."""

    ZERO = 0
    """softmax 0, log_softmax -inf, logsumexp -inf."""
    NAN = 1
    """NaN throughout (``masked_fill(-inf)`` then torch's softmax)."""

    @classmethod
    def of(cls, name: str) -> MaskedRows:
        """The value of the public argument's name ("zero" or "nan")."""
        return cls[name.upper()]
