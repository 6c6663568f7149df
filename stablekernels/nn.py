"""``torch.nn`` modules over the stablekernels functions."""

from __future__ import annotations

import torch

from . import _api


class _AlongDim(torch.nn.Module):
    def __init__(self, dim: int, *, backend: str | None = None) -> None:
        super().__init__()
        self.dim = dim
        self.backend = backend

    def extra_repr(self) -> str:
        extra = f", backend={self.backend!r}" if self.backend is not None else ""
        return f"dim={self.dim}{extra}"


class Softmax(_AlongDim):
    """:func:`stablekernels.softmax` along ``dim`` as a module (input of any shape, output
    of the same shape and dtype). Unlike ``torch.nn.Softmax``, ``dim`` must be given: the
    implicit choice torch deprecated is not offered."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _api.softmax(x, self.dim, backend=self.backend)


class LogSoftmax(_AlongDim):
    """:func:`stablekernels.log_softmax` along ``dim`` as a module; ``dim`` must be given."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _api.log_softmax(x, self.dim, backend=self.backend)
