"""Reference values in extended precision (numpy ``longdouble``: 64-bit significand on
x86-64), for finite inputs.

float64 through torch is a fine reference for float32 and half results, but not for
float64 ones: torch's own float64 log_softmax loses relative precision on entries near 0.
These references carry 11 more bits than float64 and use the log1p form, so their error is
far below a float64 result's. They are returned as float64 tensors (rounded once).
"""

from __future__ import annotations

import numpy as np
import torch


def _row_stats(x: torch.Tensor, dim: int):
    a = x.detach().double().numpy().astype(np.longdouble)
    m = a.max(axis=dim, keepdims=True)
    t = a - m
    is_max = a == m
    rest = np.where(is_max, 0, np.exp(t)).sum(axis=dim, keepdims=True)
    s = rest + (is_max.sum(axis=dim, keepdims=True) - 1)
    return m, t, s


def _out(a) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float64))


def softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    m, t, s = _row_stats(x, dim)
    return _out(np.exp(t) / (1 + s))


def log_softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    m, t, s = _row_stats(x, dim)
    return _out(t - np.log1p(s))


def logsumexp(x: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
    m, t, s = _row_stats(x, dim)
    lse = m + np.log1p(s)
    return _out(lse if keepdim else np.squeeze(lse, axis=dim))


def backward(name: str, x: torch.Tensor, dy: torch.Tensor, dim: int) -> torch.Tensor:
    """The gradient of ``name`` (softmax, log_softmax or logsumexp without keepdim) at x for
    the output gradient dy, from the extended-precision softmax p:

        softmax      dx = p * (dy - sum(dy * p))
        log_softmax  dx = dy - p * sum(dy)
        logsumexp    dx = dy * p
    """
    m, t, s = _row_stats(x, dim)
    p = np.exp(t) / (1 + s)
    g = dy.detach().double().numpy().astype(np.longdouble)
    if name == "softmax":
        dx = p * (g - (g * p).sum(axis=dim, keepdims=True))
    elif name == "log_softmax":
        dx = g - p * g.sum(axis=dim, keepdims=True)
    elif name == "logsumexp":
        dx = np.expand_dims(g, dim) * p
    else:
        raise ValueError(name)
    return _out(dx)
