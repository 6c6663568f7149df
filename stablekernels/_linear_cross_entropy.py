"""``sk.linear_cross_entropy`` and ``sk.linear_logprobs``: the loss (or the target's
log-probability) of a linear output layer without ever holding its (rows x V) logits.

Shapes: input (*, H), linear_weight (V, H), linear_bias (V,), class-index targets of shape
(*) (int64 or uint8). The input is viewed as (rows, H); the op
``stablekernels::linear_cross_entropy`` computes each row's loss, lse, entropy and target
log-probability over tiles of the vocabulary (:mod:`stablekernels._linear_tiles`), and the
reduction happens here on the per-row values, as :func:`stablekernels.cross_entropy`'s.

Class-probability targets (floating, of shape (*, V)) take a slower path,
:func:`_probability_loss`: the rows in chunks, each chunk's logits made whole and handed
to :func:`stablekernels.cross_entropy`, under activation checkpointing so that the backward
recomputes them one chunk at a time.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import _linear_tiles
from ._api import _check_int, _check_tensor, resolve_backend
from ._cross_entropy import (
    _check_options,
    _dtype_name,
    _probability_targets,
    cross_entropy,
    reduce_class_rows,
    split_z_loss,
)
from .ops._checks import check_same_device
from .ops._library import ops
from .ops.cross_entropy import loss_dtype
from .ops.linear_cross_entropy import check_linear_problem, linear_accumulation_dtype
from .ops.logsumexp import logsumexp
from .ops.softmax import log_softmax


def _is_probabilities(input, linear_weight, target) -> bool:
    """Whether ``target`` holds class probabilities: the shape (*, V), as torch decides
    (by the shape alone; the dtype is checked after)."""
    batch_shape = tuple(input.shape[:-1])
    return tuple(target.shape) == (*batch_shape, linear_weight.shape[0])


def _rows(op, input, linear_weight, target, probabilities_ok=False):
    """(x as (rows, H), target as (rows,) int64 or, for class probabilities when
    ``probabilities_ok``, as (rows, V) of its own dtype, the batch shape), after torch's
    checks."""
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
    vocab = linear_weight.shape[0]
    x = input.reshape(math.prod(batch_shape), input.shape[-1])
    if _is_probabilities(input, linear_weight, target) and (
        probabilities_ok or target.is_floating_point()
    ):
        if not probabilities_ok:
            raise NotImplementedError(
                f"{op}(): class-probability targets are not supported (a log-probability "
                "needs class indices)"
            )
        # torch's check and words (the dtype; ignore_index is checked by the caller)
        _probability_targets(input, target, -100)
        return x, target.reshape(x.shape[0], vocab), batch_shape
    if batch_shape and target.dim() and target.shape[0] != batch_shape[0]:
        raise ValueError(  # torch's words (F.cross_entropy of the logits)
            f"Expected input batch_size ({batch_shape[0]}) to match target batch_size "
            f"({target.shape[0]})."
        )
    if tuple(target.shape) != batch_shape:
        also = (
            f" (class indices) or {[*batch_shape, vocab]} (class probabilities)"
            if probabilities_ok
            else " (the input's shape without its last dim)"
        )
        raise RuntimeError(
            f"{op}(): expected target of shape {list(batch_shape)}{also}, got {list(target.shape)}"
        )
    if target.dtype not in (torch.int64, torch.uint8):
        raise RuntimeError(
            f"expected target dtype to be Long or Byte, but got {_dtype_name(target.dtype)}"
        )
    return x, target.reshape(-1).long(), batch_shape


def probability_chunk_rows(rows: int, vocab: int) -> int:
    """The rows of one chunk of the class-probability path: as many as keep the chunk's
    logits within the largest of ``TILE_ELEMENTS`` and ``MIN_CHUNK_ROWS`` rows of logits
    capped at ``MAX_CHUNK_ELEMENTS`` (:mod:`stablekernels._linear_tiles`; 4M elements,
    1024 rows, 64M elements), all of them if fewer, at least 1."""
    tiles = _linear_tiles
    budget = max(tiles.TILE_ELEMENTS, min(tiles.MIN_CHUNK_ROWS * vocab, tiles.MAX_CHUNK_ELEMENTS))
    return max(1, min(rows, budget // max(vocab, 1)))


def _check_probability_problem(op, x, linear_weight, linear_bias, weight, softcap, temperature):
    """The op's checks of the class-index path (stablekernels.ops.linear_cross_entropy),
    in its words."""
    tensors = check_linear_problem(op, x, linear_weight, linear_bias, weight, softcap, temperature)
    check_same_device(op, *tensors)


def _autocast_off(device: torch.device):
    """Autocast off on ``device`` (the chunk's matmul stays in the accumulation dtype)."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _probability_chunk(x_r, w_acc, b_acc, q_r, weight, options):
    """(loss, lse?, entropy?) per row of one chunk: its logits z (chunk, V) in the
    accumulation dtype of ``w_acc``, then :func:`stablekernels.cross_entropy` of z against
    the probabilities ``q_r`` (chunk, V) with ``reduction="none"``; the lse and the entropy
    of softmax(z) when asked. Every intermediate is at most (chunk, V)."""
    label_smoothing, z_loss, softcap, temperature, want_lse, want_entropy, backend = options
    with _autocast_off(x_r.device):
        z = F.linear(x_r.to(w_acc.dtype), w_acc, b_acc)
        if temperature != 1.0:
            z = z / temperature
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        out = [
            cross_entropy(
                z,
                q_r,
                weight,
                reduction="none",
                label_smoothing=label_smoothing,
                z_loss=z_loss,
                backend=backend,
            )
        ]
        if want_lse:
            out.append(logsumexp(z, -1, backend=backend))
        if want_entropy:
            logp = log_softmax(z, -1, backend=backend)
            p = logp.exp()
            # 0 log 0 = 0, its gradient 0 too (logp masked before the product)
            out.append(-(p * torch.where(p > 0, logp, 0.0)).sum(-1))
    return tuple(out)


def _probability_loss(
    op,
    x,
    linear_weight,
    linear_bias,
    q,
    batch_shape,
    weight,
    ignore_index,
    reduction,
    label_smoothing,
    z_loss,
    softcap,
    temperature,
    return_lse,
    return_entropy,
    backend,
):
    """:func:`linear_cross_entropy` of class probabilities ``q`` (rows, V): the rows in
    chunks of :func:`probability_chunk_rows`, each through :func:`_probability_chunk` under
    ``torch.utils.checkpoint`` (non-reentrant), which keeps only the chunk's inputs (views)
    for the backward and recomputes its logits there: one chunk's logits (and their
    gradient) live at a time, forward and backward. The weight and bias are converted to
    the accumulation dtype once, so their gradients accumulate over the chunks in it and
    are rounded once to their own dtypes. The per-row losses are reduced in float64:
    "mean" divides by the number of rows (torch's rule for probabilities; NaN for V = 0).
    Under torch.func transforms (which refuse checkpointing's saved-tensor hooks) the chunks
    are not checkpointed: the same values and gradients, but the backward then holds every
    chunk's intermediates."""
    if ignore_index >= 0:
        _probability_targets(x, q, ignore_index)  # torch's error
    _check_probability_problem(op, x, linear_weight, linear_bias, weight, softcap, temperature)
    rows, vocab = q.shape
    acc = linear_accumulation_dtype(x, linear_weight, linear_bias)
    options = (
        label_smoothing,
        z_loss,
        softcap,
        temperature,
        return_lse,
        return_entropy,
        backend,
    )
    w_acc = linear_weight.to(acc)
    b_acc = None if linear_bias is None else linear_bias.to(acc)
    # torch.func's grad and vjp refuse the saved-tensor hooks of checkpointing: under them
    # the chunks keep their saved intermediates (correct; memory not bounded by a chunk)
    recompute = (
        torch.is_grad_enabled()
        and any(
            t is not None and t.requires_grad for t in (x, linear_weight, linear_bias, q, weight)
        )
        and not torch._C._are_functorch_transforms_active()
    )
    step = probability_chunk_rows(rows, vocab)
    # split, not slices: the chunks' input gradients are joined once (one cat), not each
    # scattered into a zero (rows, H); an empty batch still takes one (empty) chunk, so
    # the loss keeps its graph and dtype
    x_chunks, q_chunks = (x.split(step), q.split(step)) if rows else ((x,), (q,))
    outputs = []
    for x_r, q_r in zip(x_chunks, q_chunks, strict=True):
        args = (x_r, w_acc, b_acc, q_r, weight, options)
        if recompute:
            chunk = checkpoint(
                _probability_chunk, *args, use_reentrant=False, preserve_rng_state=False
            )
        else:
            chunk = _probability_chunk(*args)
        outputs.append(chunk)
    columns = zip(*outputs, strict=True)
    per_row = [torch.cat(parts) if len(parts) > 1 else parts[0] for parts in columns]
    loss = per_row[0]
    if reduction == "sum":
        loss = loss.double().sum()
    elif reduction == "mean":
        # torch divides by input.numel() / C: the rows, NaN without classes
        loss = loss.double().sum() / (float(rows) if vocab else float("nan"))
    else:
        loss = loss.reshape(batch_shape)
    return loss, [t.reshape(batch_shape) for t in per_row[1:]]


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
    :func:`stablekernels.cross_entropy` (``z_loss``, with its reductions). Targets as
    torch's: class indices of the input's batch shape (*) (int64 or uint8), or class
    probabilities of shape (*, V) (floating; ``ignore_index`` must stay negative, as torch).

    Class probabilities take a slower path: the rows in chunks of at most max(4M / V, 1024
    capped at 64M / V) rows (:func:`probability_chunk_rows`), each chunk's logits (chunk, V)
    made in the accumulation dtype and passed to :func:`stablekernels.cross_entropy` (``loss =
    -sum_c w_c p_c log_softmax(z)_c`` with p smoothed, plus ``z_loss * lse**2`` per row; "mean"
    divides by the number of rows, as torch), under activation checkpointing: the backward
    recomputes each chunk's logits, about one extra forward matmul, and memory beyond the inputs
    and gradients is a few (chunk, V) tensors (never (rows, V)) plus, for half weights, the
    weight in the accumulation dtype. The loss there has the dtype of the input's (as below)
    promoted with the target's, as torch.

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
    x, flat, batch_shape = _rows(op, input, linear_weight, target, probabilities_ok=True)
    vocab = linear_weight.shape[0]
    label_smoothing, z_loss = float(label_smoothing), float(z_loss)
    _check_options(input, weight, reduction, label_smoothing, vocab, op)
    ignore_index = _check_int(op, "ignore_index", ignore_index)
    name = resolve_backend(backend, input.device)
    if flat.is_floating_point():  # class probabilities (rows, V)
        loss, extra = _probability_loss(
            op, x, linear_weight, linear_bias, flat, batch_shape, weight, ignore_index,
            reduction, label_smoothing, z_loss, None if softcap is None else float(softcap),
            float(temperature), return_lse, return_entropy, name,
        )  # fmt: skip
        # as torch: the loss of probabilities promotes with them
        loss = loss.to(torch.promote_types(loss_dtype(input), target.dtype))
        return (loss, *extra) if extra else loss
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
    ignore_index = _check_int(op, "ignore_index", ignore_index)
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
