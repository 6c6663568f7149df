"""The ``triton`` backend: Triton kernels for CUDA tensors, and for CPU tensors under the
Triton interpreter (TRITON_INTERPRET=1, set before triton is imported).

softmax.py holds softmax and log_softmax, logsumexp.py logsumexp, cross_entropy.py the
cross-entropy from logits, each forward and backward; common.py the row view, launch
heuristics and the (m, s') math. Computation is in
fp32 (fp64 for fp64 tensors); halves are read as fp32 and rounded once.

The launchers are registered as ``torch.library.triton_op``s (their kernels launched through
``wrap_triton``): ``stablekernels::triton_softmax``, ``triton_logsumexp``,
``triton_softmax_backward``, ``triton_logsumexp_backward``, ``triton_cross_entropy`` and
``triton_cross_entropy_backward``, which the backend functions below call. (Called directly
on CUDA tensors under ``torch.compile``, inductor sees their kernels; through the public ops
they run inside the op, like every backend.)
"""

from __future__ import annotations

import torch
from torch.library import triton_op

from . import cross_entropy as _cross_entropy
from . import logsumexp as _logsumexp
from . import softmax as _softmax


@triton_op("stablekernels::triton_softmax", mutates_args={})
def _triton_softmax(x: torch.Tensor, dim: int, out_dtype: torch.dtype, log: bool) -> torch.Tensor:
    return _softmax.forward(x, dim, out_dtype, log)


@triton_op("stablekernels::triton_softmax_backward", mutates_args={})
def _triton_softmax_backward(
    grad: torch.Tensor, output: torch.Tensor, dim: int, input_dtype: torch.dtype, log: bool
) -> torch.Tensor:
    return _softmax.backward(grad, output, dim, input_dtype, log)


@triton_op("stablekernels::triton_logsumexp", mutates_args={})
def _triton_logsumexp(
    x: torch.Tensor, dim: int, keepdim: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return _logsumexp.forward(x, dim, keepdim)


@triton_op("stablekernels::triton_logsumexp_backward", mutates_args={})
def _triton_logsumexp_backward(
    grad: torch.Tensor, x: torch.Tensor, result: torch.Tensor, dim: int, keepdim: bool
) -> torch.Tensor:
    return _logsumexp.backward(grad, x, result, dim, keepdim)


def softmax(x, dim: int, out_dtype: torch.dtype) -> torch.Tensor:
    return _triton_softmax(x, dim, out_dtype, False)


def log_softmax(x, dim: int, out_dtype: torch.dtype) -> torch.Tensor:
    return _triton_softmax(x, dim, out_dtype, True)


def logsumexp(x, dim: int, keepdim: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _triton_logsumexp(x, dim, keepdim)


def softmax_backward(grad, output, dim: int, input_dtype: torch.dtype) -> torch.Tensor:
    return _triton_softmax_backward(grad, output, dim, input_dtype, False)


def log_softmax_backward(grad, output, dim: int, input_dtype: torch.dtype) -> torch.Tensor:
    return _triton_softmax_backward(grad, output, dim, input_dtype, True)


def logsumexp_backward(grad, x, result, dim: int, keepdim: bool) -> torch.Tensor:
    return _triton_logsumexp_backward(grad, x, result, dim, keepdim)


@triton_op("stablekernels::triton_cross_entropy", mutates_args={})
def _triton_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _cross_entropy.forward(logits, target, weight, ignore_index, label_smoothing, z_loss)


@triton_op("stablekernels::triton_cross_entropy_backward", mutates_args={})
def _triton_cross_entropy_backward(
    grad_loss: torch.Tensor,
    grad_lse: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    lse: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
) -> torch.Tensor:
    return _cross_entropy.backward(
        grad_loss, grad_lse, logits, target, weight, lse, ignore_index, label_smoothing, z_loss
    )


def cross_entropy(logits, target, weight, ignore_index, label_smoothing, z_loss):
    return _triton_cross_entropy(logits, target, weight, ignore_index, label_smoothing, z_loss)


def cross_entropy_backward(
    grad_loss, grad_lse, logits, target, weight, lse, ignore_index, label_smoothing, z_loss
):
    return _triton_cross_entropy_backward(
        grad_loss, grad_lse, logits, target, weight, lse, ignore_index, label_smoothing, z_loss
    )
