"""``sk.cross_entropy``: torch.nn.functional.cross_entropy's semantics, from a fused kernel.

Shapes: input (C), (N, C) or (N, C, d1, ...); class-index targets of shape (), (N) or
(N, d1, ...) (int64 or uint8), or class probabilities of the input's shape. The input is
viewed as (rows, C) (a copy only when the class dim is not the last, for (N, C, d1, ...)),
the fused op computes each row's loss and log-sum-exp and reduces them (class targets; the
probability targets' rows are reduced here).
"""

from __future__ import annotations

import math

import torch

from ._api import (
    _PREPARED,
    _check_int,
    _check_tensor,
    _overriding_backend,
    _prepared,
    callable_kernel,
    resolve_backend,
)
from ._numerics import accumulation_dtype
from .ops._checks import _kernels
from .ops._library import Prepared, apply_prepared, call_op, direct
from .ops.cross_entropy import _check_cross_entropy, counted_targets, loss_dtype
from .ops.logsumexp import logsumexp
from .ops.softmax import log_softmax

REDUCTIONS = ("mean", "sum", "none")


def _as_rows(t: torch.Tensor, batch_shape, classes: int) -> torch.Tensor:
    """(C) -> (1, C); (N, C, d1, ...) -> (N * d1 * ..., C) (also for C == 0)."""
    if t.dim() == 2:
        return t
    rows = math.prod(batch_shape)
    if t.dim() == 1:
        return t.reshape(1, classes)
    return t.movedim(1, -1).reshape(rows, classes)


def _check_options(input, weight, reduction, label_smoothing, classes, op="cross_entropy"):
    if weight is not None and not isinstance(weight, torch.Tensor):
        raise TypeError(f"{op}(): argument 'weight' must be Tensor, not {type(weight).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    if not 0.0 <= label_smoothing <= 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    if weight is not None:
        if weight.shape != (classes,):
            raise RuntimeError(
                f"weight tensor should be defined either for all {classes} classes or no classes "
                f"but got weight tensor of shape: {list(weight.shape)}"
            )
        if weight.device != input.device:
            raise RuntimeError(f"weight is on {weight.device}, input on {input.device}")


# ATen's names of the dtypes (torch's target errors name them so).
_SCALAR_TYPE_NAMES = {
    torch.float32: "Float",
    torch.float64: "Double",
    torch.float16: "Half",
    torch.bfloat16: "BFloat16",
    torch.int64: "Long",
    torch.int32: "Int",
    torch.int16: "Short",
    torch.int8: "Char",
    torch.uint8: "Byte",
    torch.bool: "Bool",
    torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble",
}


def _dtype_name(dtype: torch.dtype) -> str:
    return _SCALAR_TYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def _probability_targets(input, target, ignore_index):
    """torch's checks of a target of the input's shape, which holds class probabilities."""
    if not target.is_floating_point():
        raise RuntimeError(
            "Expected floating point type for target with class probabilities, got "
            f"{_dtype_name(target.dtype)}"
        )
    if ignore_index >= 0:
        raise RuntimeError("ignore_index is not supported for floating point target")


def _class_targets(input, target: torch.Tensor, batch_shape, classes: int):
    """torch's checks of a class-index target (any shape but the input's), in torch's order
    (the batch size, the target's dims, then its dtype) and words; the target as a flat
    int64 vector of the rows."""
    if input.dim() == 1:  # (C): a target of () or (1,)
        if target.dim() > 1:
            raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")
        if target.dim() == 1 and target.shape[0] != 1:
            raise ValueError(
                f"For 1D input, 1D target must have size 1, but got target size: {target.shape[0]}"
            )
    else:
        target_batch = target.shape[0] if target.dim() else 0
        if target_batch != batch_shape[0]:
            raise ValueError(
                f"Expected input batch_size ({batch_shape[0]}) to match target batch_size "
                f"({target_batch})."
            )
        if input.dim() == 2 and target.dim() != 1:
            raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")
        if input.dim() > 2 and tuple(target.shape) != tuple(batch_shape):
            raise RuntimeError(
                f"Expected target size {list(batch_shape)}, got {list(target.shape)}"
            )
    if target.dtype not in (torch.int64, torch.uint8):
        hint = (
            f" (a floating target holds class probabilities and needs the input's shape "
            f"{tuple(input.shape)}, not {tuple(target.shape)})"
            if target.is_floating_point()
            else ""
        )
        raise RuntimeError(
            f"expected target dtype to be Long or Byte, but got {_dtype_name(target.dtype)}{hint}"
        )
    # Out-of-range values are the op's to refuse (stablekernels.ops.cross_entropy), once.
    return target.reshape(-1).long()


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    return_lse: bool = False,
    backend: str | None = None,
):
    """Cross-entropy from logits, as ``torch.nn.functional.cross_entropy``, fused.

    For each row (logits x over C classes, target t, class weights w, smoothing e):

        loss = (1 - e) * w_t * (lse - x_t) + (e / C) * sum_c w_c (lse - x_c) + z_loss * lse**2

    with lse - x_t computed as (max - x_t) + log1p(s'), so a confident correct prediction's
    loss keeps relative precision (logits [0, -20], target 0: 2.0611536e-09; torch gives 0).
    Rows whose target is ``ignore_index`` count nothing. Reductions as torch: "mean" divides
    by the summed weights of the counted rows (NaN when all are ignored), "sum", "none"
    (the batch shape). Class-probability targets (the input's shape, floating) follow torch:
    loss = -sum_c w_c p_c log_softmax(x)_c with p smoothed; "mean" divides by the row count.

    ``z_loss`` (PaLM's auxiliary loss) is a per-row penalty z * lse**2 on the counted rows,
    never weighted by the class weights: "none" adds z * lse**2 to each counted row, "sum"
    adds z * sum(lse**2), and "mean" adds z * sum(lse**2) / (number of counted rows) to the
    weighted mean of the cross-entropy, so scaling the weights leaves it unchanged.
    ``return_lse=True`` returns ``(loss, lse)``, the per-row log-sum-exp in fp32, of the
    batch shape.

    Dtypes: the loss has the input's dtype (float32 under autocast, as torch); halves are
    computed in fp32. Gradients flow to the input only (a weight that requires grad raises,
    as in torch); the backward computes dx = (softmax - smoothed one-hot) * weight * grad in
    one pass from the saved lse, allocating nothing of the logits' size but dx.
    """
    fast = _fast_class_rows(
        input, target, weight, ignore_index, reduction, label_smoothing, z_loss, backend
    )
    if fast is not None:
        kernel, out_dtype, name, autograd = fast
        args = (input, target, weight, ignore_index, float(label_smoothing), float(z_loss))
        if torch.is_grad_enabled() and torch._C._any_requires_grad(input, weight):
            loss, lse, _counts = apply_prepared("cross_entropy", autograd, *args, reduction, name)
        else:
            loss, lse, _counts = kernel(*args, reduction)
        loss = loss if loss.dtype == out_dtype else loss.to(out_dtype)
        return (loss, lse.float()) if return_lse else loss
    input = _check_tensor("cross_entropy", input)
    if not input.is_floating_point():  # torch: log_softmax "not implemented for 'Long'"
        raise NotImplementedError(f"cross_entropy(): expected a floating input, got {input.dtype}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(
            f"cross_entropy(): argument 'target' must be Tensor, not {type(target).__name__}"
        )
    ignore_index = _check_int("cross_entropy", "ignore_index", ignore_index)
    if input.dim() == 0:
        if target.dim() == 0:  # the input's shape: class probabilities, as torch decides
            _probability_targets(input, target, ignore_index)
        raise IndexError("cross_entropy(): input must have at least one dim (the classes)")
    classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    batch_shape = () if input.dim() == 1 else (input.shape[0], *input.shape[2:])
    label_smoothing, z_loss = float(label_smoothing), float(z_loss)
    _check_options(input, weight, reduction, label_smoothing, classes)
    name = resolve_backend(backend, input.device)
    logits = _as_rows(input, batch_shape, classes)

    if target.shape == input.shape:  # class probabilities, as torch decides
        _probability_targets(input, target, ignore_index)
        rows, lse = _soft_rows(
            logits, _as_rows(target, batch_shape, classes), weight, label_smoothing, z_loss, name
        )
        # torch divides by input.numel() / C: NaN for C == 0
        denominator = float(rows.numel()) if classes else float("nan")
        loss = _reduce(rows, reduction, denominator, batch_shape)
    else:
        flat = _class_targets(input, target, batch_shape, classes)
        loss, lse, _counts = call_op(
            "cross_entropy",
            logits,
            flat,
            weight,
            ignore_index,
            label_smoothing,
            z_loss,
            reduction,
            name,
        )
        if reduction == "none":
            loss = loss.reshape(batch_shape)

    out_dtype = loss_dtype(input)
    if target.shape == input.shape:  # as torch: the loss of probabilities promotes with them
        out_dtype = torch.promote_types(out_dtype, target.dtype)
    loss = loss.to(out_dtype)
    if return_lse:
        return loss, lse.float().reshape(batch_shape)
    return loss


def _fast_class_rows(
    input, target, weight, ignore_index, reduction, label_smoothing, z_loss, backend
):
    """(the backend's fused kernel, the loss dtype, the backend's name, the op's forward for
    ``apply_prepared``) for an eager call that :func:`direct` allows (stablekernels._api's
    prepared path) on (R, C) logits, R, C > 0, with (R,) int64 targets and class weights, if
    any, of the accumulation dtype; else None (the general path serves it). The checks that
    depend on the types alone are made once per combination; the shapes, here."""
    if not (isinstance(input, torch.Tensor) and isinstance(target, torch.Tensor)):
        return None
    if not (weight is None or isinstance(weight, torch.Tensor)):
        return None
    if not direct((input, target, weight)):
        return None
    if input.dim() != 2 or target.dim() != 1 or target.shape[0] != input.shape[0]:
        return None
    if not input.numel() or (
        weight is not None and (weight.shape != input.shape[1:] or not weight.is_contiguous())
    ):
        return None
    key = (
        "cross_entropy", input.dtype, input.device, target.dtype, target.device,
        None if weight is None else (weight.dtype, weight.device), ignore_index, reduction,
        label_smoothing, z_loss, backend, _overriding_backend(),
    )  # fmt: skip
    answer = _PREPARED.get(key, _PREPARED)
    if answer is _PREPARED:
        answer = _prepared(
            key, _prepare_class_rows, input, target, weight, ignore_index, reduction,
            label_smoothing, z_loss, backend,
        )  # fmt: skip
    return answer


def _prepare_class_rows(
    input, target, weight, ignore_index, reduction, label_smoothing, z_loss, backend
):
    if not input.is_floating_point() or target.dtype != torch.int64:
        return None
    if type(ignore_index) is not int or type(label_smoothing) not in (int, float):
        return None
    if type(z_loss) not in (int, float):
        return None
    _check_options(input, weight, reduction, float(label_smoothing), input.shape[1])
    _check_cross_entropy("cross_entropy", input, target, weight)
    acc = accumulation_dtype(input.dtype)
    if weight is not None and weight.dtype != acc:
        return None
    name = resolve_backend(backend, input.device)
    kernels = _kernels("cross_entropy", name, input)
    if kernels.cross_entropy_loss is None:
        return None
    kernel = callable_kernel(kernels.cross_entropy_loss)
    # The op's arguments: the kernel's and the backend.
    forward = Prepared(lambda *args: kernel(*args[:-1]), kernels)
    return kernel, input.dtype, name, forward


def split_z_loss(z_loss: float, weight, reduction: str, classes: int) -> tuple[float, float]:
    """(z-loss the op adds per row, z-loss added apart from the op's lse output).

    The z-loss is a per-row penalty, never weighted: its mean is over the counted rows,
    while the weighted mean divides by their summed weights. With class weights the two
    means differ, so the z-loss is then added by :func:`reduce_class_rows` (its gradient
    flows through the op's lse output); elsewhere the op adds it per row."""
    weighted_mean = reduction == "mean" and weight is not None and classes > 0
    z_apart = z_loss if weighted_mean else 0.0
    return z_loss - z_apart, z_apart


def reduce_class_rows(
    rows, lse, flat, weight, classes, ignore_index, reduction, z_apart, batch_shape
):
    """The reduced loss of per-row class-target losses ``rows`` (0 on ignored rows), as
    torch: "mean" divides by the summed class weights of the counted rows (their number
    without weights), then adds the z-loss kept apart (:func:`split_z_loss`)."""
    safe, counted = counted_targets(flat, ignore_index)
    if weight is None or classes == 0:  # with no classes, every row is ignored
        denominator = counted.sum().to(rows.dtype)
    else:
        target_weights = weight.index_select(0, safe)
        denominator = torch.where(counted, target_weights, 0).sum().to(rows.dtype)
    loss = _reduce(rows, reduction, denominator, batch_shape)
    if reduction == "mean" and z_apart:
        loss = loss + _z_loss_mean(lse, counted, z_apart).to(loss.dtype)
    return loss


def _reduce(rows, reduction, denominator, batch_shape):
    if reduction == "none":
        return rows.reshape(batch_shape)
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / denominator


def _z_loss_mean(lse, counted, z_loss):
    """z_loss * sum of lse**2 over the counted rows / their number, in float64 (NaN when no
    row counts, as the mean of the loss itself). Ignored rows are masked before squaring,
    so a non-finite lse there reaches neither the value nor the gradient."""
    kept = torch.where(counted, lse, 0.0)
    return z_loss * (kept * kept).sum() / counted.sum().to(lse.dtype)


def _soft_rows(logits, probabilities, weight, label_smoothing, z_loss, backend):
    """Per-row losses and lse (fp64) for class-probability targets, through the fused
    log_softmax (one (rows, C) intermediate, as torch). The losses are computed in the
    accumulation dtype of the logits promoted with the probabilities' dtype (fp32; fp64
    when either is fp64)."""
    classes = logits.shape[1]
    acc = torch.promote_types(accumulation_dtype(logits.dtype), probabilities.dtype)
    p = probabilities.to(acc)
    if label_smoothing and classes:
        p = p * (1 - label_smoothing) + label_smoothing / classes
    logp = log_softmax(logits, -1, dtype=acc, backend=backend)
    if weight is not None:
        logp = logp * weight.to(acc)
    rows = -(p * logp).sum(-1)
    lse = logsumexp(logits.to(acc), -1, backend=backend).double()
    if z_loss:
        rows = rows + z_loss * lse.to(acc) ** 2
    return rows, lse
