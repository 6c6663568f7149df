"""``torch.nn`` modules over the stablekernels functions."""

from __future__ import annotations

import torch

from . import _cross_entropy, _linear_cross_entropy
from .ops import softmax as _softmax


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
        return _softmax.softmax(x, self.dim, backend=self.backend)


class LogSoftmax(_AlongDim):
    """:func:`stablekernels.log_softmax` along ``dim`` as a module; ``dim`` must be given."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _softmax.log_softmax(x, self.dim, backend=self.backend)


class CrossEntropyLoss(torch.nn.Module):
    """:func:`stablekernels.cross_entropy` as a module, with the same options (``weight`` is
    kept as a buffer, as in ``torch.nn.CrossEntropyLoss``)."""

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        *,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        return_lse: bool = False,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if reduction not in _cross_entropy.REDUCTIONS:
            raise ValueError(f"{reduction} is not a valid value for reduction")
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.return_lse = return_lse
        self.backend = backend

    def forward(self, input: torch.Tensor, target: torch.Tensor):
        return _cross_entropy.cross_entropy(
            input,
            target,
            self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            return_lse=self.return_lse,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}"
        )


class LinearCrossEntropyLoss(CrossEntropyLoss):
    """:func:`stablekernels.linear_cross_entropy` as a module: ``forward(input,
    linear_weight, target, linear_bias=None)`` with the options of
    :class:`CrossEntropyLoss` (``weight``, the class weights, kept as a buffer) and
    ``softcap`` and ``temperature``. ``target``: class indices of the input's batch shape
    (*), or class probabilities (*, V) (the slower chunked path of
    :func:`stablekernels.linear_cross_entropy`)."""

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        *,
        softcap: float | None = None,
        temperature: float = 1.0,
        **options,
    ) -> None:
        super().__init__(weight, **options)
        self.softcap = softcap
        self.temperature = temperature

    def forward(self, input, linear_weight, target, linear_bias=None):
        return _linear_cross_entropy.linear_cross_entropy(
            input,
            linear_weight,
            target,
            linear_bias=linear_bias,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            temperature=self.temperature,
            return_lse=self.return_lse,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, softcap={self.softcap}, temperature={self.temperature}"
