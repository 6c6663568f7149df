"""The ``cpp`` and ``cuda`` backends: the kernels of the compiled extension
``stablekernels._C``, through its fused ops (csrc/bindings/registration.cpp). The dispatcher
runs the C++ CPU kernels (csrc/cpu) for CPU tensors and the CUDA kernels (csrc/cuda) for
CUDA tensors, so both backends share this module."""

from __future__ import annotations

import torch

_ops = torch.ops.stablekernels


def softmax(x: torch.Tensor, dim: int, out_dtype: torch.dtype) -> torch.Tensor:
    return _ops.fused_softmax(x, dim, out_dtype, False)


def log_softmax(x: torch.Tensor, dim: int, out_dtype: torch.dtype) -> torch.Tensor:
    return _ops.fused_softmax(x, dim, out_dtype, True)


def logsumexp(x: torch.Tensor, dim: int, keepdim: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _ops.fused_logsumexp(x, dim, keepdim)


def softmax_backward(grad, output, dim: int, input_dtype: torch.dtype) -> torch.Tensor:
    return _ops.fused_softmax_backward(grad, output, dim, input_dtype, False)


def log_softmax_backward(grad, output, dim: int, input_dtype: torch.dtype) -> torch.Tensor:
    return _ops.fused_softmax_backward(grad, output, dim, input_dtype, True)


def logsumexp_backward(grad, x, result, dim: int, keepdim: bool) -> torch.Tensor:
    return _ops.fused_logsumexp_backward(grad, x, result, dim, keepdim)


def cross_entropy(
    logits, target, weight, ignore_index: int, label_smoothing: float, z_loss: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return _ops.fused_cross_entropy(logits, target, weight, ignore_index, label_smoothing, z_loss)


def cross_entropy_backward(
    grad_loss,
    grad_lse,
    logits,
    target,
    weight,
    lse,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
) -> torch.Tensor:
    return _ops.fused_cross_entropy_backward(
        grad_loss, grad_lse, logits, target, weight, lse, ignore_index, label_smoothing, z_loss
    )
