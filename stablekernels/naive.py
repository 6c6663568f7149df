"""The textbook formulas, exactly as the tutorials write them. Unstable on purpose.

For comparison only (the demo, the tests and the benchmarks): ``exp`` overflows to inf
past x = 88.7 in float32 (so softmax([1000, 0]) is [nan, 0]), underflows to 0 below
x = -103 (so softmax([-1000, -1000]) is [nan, nan]), and log(sum(exp)) rounds small
log-probabilities to 0.
"""

from __future__ import annotations

import torch


def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``exp(x) / sum(exp(x))``, with no max shift."""
    e = torch.exp(x)
    return e / e.sum(dim=dim, keepdim=True)


def log_softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``log(exp(x) / sum(exp(x)))``: the log of the naive softmax."""
    return torch.log(softmax(x, dim))


def logsumexp(x: torch.Tensor, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    """``log(sum(exp(x)))``, with no max shift."""
    return torch.log(torch.exp(x).sum(dim=dim, keepdim=keepdim))
