"""``sk.linear_cross_entropy`` and ``sk.linear_logprobs``: the loss (or the target's
log-probability) of a linear output layer without ever holding its (rows x V) logits.

Shapes: input (*, H), linear_weight (V, H), linear_bias (V,), class-index targets of shape
(*) (int64 or uint8). The input is viewed as (rows, H); the op
``stablekernels::linear_cross_entropy`` computes each row's loss, lse, entropy and target
log-probability over tiles of the vocabulary (:mod:`stablekernels._linear_tiles`), and the
reduction happens here on the per-row values, as :func:`stablekernels.cross_entropy`'s.
"""

from __future__ import annotations

import math

import torch

from ._api import _check_tensor, resolve_backend
from ._autocast import loss_dtype
from ._cross_entropy import (
    _check_options,
    _dtype_name,
    reduce_class_rows,
    split_z_loss,
)
from ._ops import linear_accumulation_dtype, ops


def _rows(op, input, linear_weight, target):
    """(x as (rows, H), target as (rows,) int64, the batch shape), after torch's checks."""
    input = _check_tensor(op, input)
    if not isinstance(linear_weight, torch.Tensor) or linear_weight.dim() != 2:
        raise RuntimeError(f"{op}(): linear_weight must be a 2-D tensor (V, H)")
    if not input.is_floating_point():
        raise RuntimeError(f"{op}(): expected a floating input, got {input.dtype}")
    if input.dim() == 0 or input.shape[-1] != linear_weight.shape[1]:
        raise RuntimeError(
            f"{op}(): input {tuple(input.shape)} and linear_weight "
            f"{tuple(linear_weight.shape)} cannot be multiplied (input's last dim must be H)"
        )
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{op}(): argument 'target' must be Tensor, not {type(target).__name__}")
    batch_shape = tuple(input.shape[:-1])
    if target.is_floating_point() and tuple(target.shape) == (*batch_shape, linear_weight.shape[0]):
        raise NotImplementedError(
            f"{op}(): class-probability targets are not supported; use "
            "sk.cross_entropy(F.linear(input, linear_weight, linear_bias), target)"
        )
    if tuple(target.shape) != batch_shape:
        raise RuntimeError(
            f"{op}(): expected target of shape {list(batch_shape)} (the input's shape without "
            f"its last dim), got {list(target.shape)}"
        )
    if target.dtype not in (torch.int64, torch.uint8):
        raise RuntimeError(
            f"expected target dtype to be Long or Byte, but got {_dtype_name(target.dtype)}"
        )
    x = input.reshape(math.prod(batch_shape), input.shape[-1])
    return x, target.reshape(-1).long(), batch_shape


def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    return_lse: bool = False,
    return_entropy: bool = False,
    backend: str | None = None,
):
    """``F.cross_entropy(z, target, weight, ...)`` of the logits
    ``z = F.linear(input, linear_weight, linear_bias) / temperature``, capped to
    ``softcap * tanh(z / softcap)`` when ``softcap`` is given (Gemma 2), computed without
    the (rows, V) logits: memory O(rows + one tile), whatever V.

    Arguments as ``torch.nn.functional.linear_cross_entropy`` (``linear_weight`` (V, H),
    ``linear_bias`` (V,), ``weight`` the class weights (V,)) plus those of
    :func:`stablekernels.cross_entropy` (``z_loss``, with its reductions). Class-index
    targets of the input's batch shape only (class probabilities raise).

    Returns the loss (the input's dtype; float32 under autocast, as torch), then, if asked,
    the per-row ``lse`` and the per-row ``entropy`` of the softmax of z (both of the batch
    shape, in the accumulation dtype; both differentiable). Logits and all intermediates
    are in float32 for half inputs (float64 if any of input, linear_weight, linear_bias is
    float64): no logit is rounded to a half type, so halves are more accurate than the
    naive formula. The three may have different dtypes (bf16 activations and fp32 weights,
    as under autocast); each gets its gradient in its own dtype. Gradients flow to input,
    linear_weight and linear_bias (first-order reverse mode; double backward and forward
    mode raise), deterministic: the same bits run to run on a given machine.
    """
    op = "linear_cross_entropy"
    x, flat, batch_shape = _rows(op, input, linear_weight, target)
    vocab = linear_weight.shape[0]
    label_smoothing, z_loss = float(label_smoothing), float(z_loss)
    _check_options(input, weight, reduction, label_smoothing, vocab)
    name = resolve_backend(backend, input.device)
    z_in_op, z_apart = split_z_loss(z_loss, weight, reduction, vocab)
    # A sum or a mean of the rows' losses, nothing else differentiated: the forward computes
    # the gradient as it goes (one matmul less) and the backward scales it.
    with_gradient = (
        reduction != "none"
        and not (z_apart or return_lse or return_entropy)
        and torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in (input, linear_weight, linear_bias))
    )
    rows, lse, entropy, *_ = ops.linear_cross_entropy(
        x,
        linear_weight,
        linear_bias,
        flat,
        weight,
        ignore_index,
        label_smoothing,
        z_in_op,
        None if softcap is None else float(softcap),
        float(temperature),
        return_entropy,
        with_gradient,
        name,
    )
    loss = reduce_class_rows(
        rows, lse, flat, weight, vocab, ignore_index, reduction, z_apart, batch_shape
    )
    loss = loss.to(loss_dtype(input))
    acc = linear_accumulation_dtype(x, linear_weight, linear_bias)
    extra = []
    if return_lse:
        extra.append(lse.to(acc).reshape(batch_shape))
    if return_entropy:
        extra.append(entropy.reshape(batch_shape))
    return (loss, *extra) if extra else loss


def linear_logprobs(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    temperature: float = 1.0,
    backend: str | None = None,
) -> torch.Tensor:
    """``log_softmax(z)[target]`` per row, for z as in :func:`linear_cross_entropy`, without
    the (rows, V) logits: the batch shape, in the accumulation dtype (float32, float64 if
    an argument is float64), 0 where
    the target is ``ignore_index``; differentiable (what a policy-gradient loss needs).
    Computed as ``-((lse - lse_k) + nll_k)`` over vocabulary tiles, so a confident
    prediction keeps relative precision (logits [0, -20] give -2.0611536e-09, not 0)."""
    op = "linear_logprobs"
    x, flat, batch_shape = _rows(op, input, linear_weight, target)
    name = resolve_backend(backend, input.device)
    _, _, _, logprob, *_ = ops.linear_cross_entropy(
        x,
        linear_weight,
        linear_bias,
        flat,
        None,
        ignore_index,
        0.0,
        0.0,
        None if softcap is None else float(softcap),
        float(temperature),
        False,
        False,
        name,
    )
    return logprob.reshape(batch_shape)
