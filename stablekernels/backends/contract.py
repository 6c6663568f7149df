"""The kernel contract every backend meets: its :class:`Kernels` record, the argument
names of each kernel (``KERNEL_ARGUMENTS``), and the check a record passes when its
backend loads (:func:`check_kernels`). docs/design.md (section 2.6) describes it.

A backend is one :class:`Kernels` record, 1:1 with the compiled ops of the extension
(``torch.ops.stablekernels._fused_*``)::

    softmax(x, dim, dtype, log)                     -> y (log_softmax if log)
    softmax_backward(grad, output, dim, input_dtype, log) -> dx
    logsumexp(x, dim, keepdim)                      -> (out in x.dtype, lse in float64)
    logsumexp_backward(grad, x, lse, dim)           -> dx
    cross_entropy(logits, target, weight, smoothing) -> (nll, smooth, lse), float64 rows
    cross_entropy_backward(logits, target, weight, terms) -> dx
    cross_entropy_loss(logits, target, weight, ignore_index, label_smoothing, z_loss,
                       reduction) -> (loss, lse, counts)          [optional]
    cross_entropy_loss_backward(grad_loss, grad_lse, logits, target, weight, lse, counts,
                                ignore_index, label_smoothing, z_loss, reduction) -> dx
    masked_softmax(x, mask, scale, causal_offset, dtype, mode, masked_rows) -> (y, lse)
    masked_softmax_backward(grad, output, lse, scale, log, input_dtype) -> dx
    linear_cross_entropy(input, linear_weight, linear_bias, target, weight, softcap,
                         temperature, smoothing) -> (nll, smooth, lse), float64 rows
    cross_entropy_tile(logits, target, class_start, weight, softcap, temperature,
                       smoothing, entropy, state) -> None            [optional]
    cross_entropy_tile_backward(logits, target, class_start, weight, terms, softcap,
                                temperature, grad_entropy) -> None   [optional]

Preconditions, which the routers of :mod:`stablekernels.ops` establish (the kernels only
assert them): floating inputs with at least one dim and no zero-size dim, ``dim`` wrapped to
be non-negative, ``grad``/``output`` of one dtype and contiguous, per-row inputs
(``grad``, ``hi``, ``lo``, ``terms``) flat and contiguous in row order, class targets in
``[0, C)``. Every kernel returns new contiguous tensors. docs/design.md states each
kernel's formula.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch


@dataclass(frozen=True)
class Kernels:
    """The kernels of one backend (see the module doc for signatures and preconditions)."""

    softmax: Callable
    softmax_backward: Callable
    logsumexp: Callable
    logsumexp_backward: Callable
    cross_entropy: Callable
    cross_entropy_backward: Callable
    cross_entropy_backward_inplace: Callable | None = None
    """cross_entropy_backward's dx written over the (contiguous) logits, returning nothing:
    the linear cross-entropy's chunk of logits becomes its gradient without a second buffer
    (cpp); None elsewhere (then a tile at a time through cross_entropy_backward)."""
    cross_entropy_loss: Callable | None = None
    """cross-entropy's loss in one call: the pieces of each row and their epilogue
    (csrc/include/stablekernels/cross_entropy_rows.h: the ignore mask, the target check, the
    class weight, smoothing, z-loss and the reduction "none"/"sum"/"mean") -> (loss per row
    or reduced, in the accumulation dtype; lse (R,) float64; counts (3,) float64 = (sum of
    counted w_t, counted rows, W)). counts[0] and counts[1] are needed for "mean" only,
    counts[2] = W with label smoothing only: what is not needed may be 0 (cuda, triton: the
    first two for "none"; every backend: W without label smoothing), never uninitialised,
    and no backward reads any of them otherwise. None where a backend has none
    (the router then runs ``torch_ce.loss_from_pieces`` around its ``cross_entropy``)."""
    cross_entropy_loss_backward: Callable | None = None
    """dx of ``cross_entropy_loss`` in one call, from the loss's gradient (per row for
    "none", 0-dim otherwise, accumulation dtype), the lse output's gradient (None or (R,)
    float64) and the forward's lse and counts (counts[0], counts[1] read for "mean" only,
    counts[2] with label smoothing only). None where a backend has none (the router then
    runs ``torch_ce.gradient_from_terms`` around its ``cross_entropy_backward``)."""
    masked_softmax: Callable | None = None
    """Of ``t = scale * x + mask`` along the last dim, dropped elements -inf
    (docs/masked_softmax.md), by ``mode`` (``stablekernels._masked.MaskedMode``): softmax,
    log_softmax (y of x's shape), the statistics only (y empty, (0,)) or the logsumexp (y
    (rows,)), y in ``dtype``; with the float64 lse (rows,). A row with nothing kept is
    0 / -inf / -inf, or NaN throughout for ``masked_rows`` = ``MaskedRows.NAN``; its lse is
    -inf either way. None where a backend has none (the router then says so)."""
    masked_softmax_backward: Callable | None = None
    """dx of ``masked_softmax`` (x's shape, ``input_dtype``) from grad and output (one dtype
    and shape, contiguous) and the forward's lse (float64, (rows,)): per row, 0 if lse is
    -inf, else ``scale *`` the softmax (log_softmax if ``log``) backward, and for log_softmax
    0 where output is -inf. None only together with ``masked_softmax``."""
    linear_cross_entropy: Callable | None = None
    """The linear cross-entropy's forward pieces of cross_entropy (nll, smooth, lse per row)
    of the logits ``softcap * tanh((input W^T + b) / (temperature * softcap))`` made and
    reduced in one kernel, without the logits in memory (triton: backends/triton/
    linear_cross_entropy.py); None where a backend has none (``_linear_tiles.forward`` then
    takes the logits a tile at a time through ``cross_entropy``)."""
    cross_entropy_tile: Callable | None = None
    """The linear cross-entropy's forward tile epilogue: a tile of raw logits x W_k^T + b_k
    (rows, n), fp32/fp64 contiguous, of the classes from ``class_start``, merged row by row
    into ``state`` (rows, 10) float64 in place (csrc/include/stablekernels/linear_tiles.h;
    class_start 0 initialises it); ``weight`` None or all V class weights. None where a
    backend has none (``_linear_tiles`` then runs ``cross_entropy`` per tile and merges)."""
    cross_entropy_tile_backward: Callable | None = None
    """Its backward: the tile overwritten by the gradient along it, from the rows' terms
    (rows, 5) and the entropy's gradient (rows,) or None; None where a backend has none."""


# The argument names of each kernel, in order: a record whose kernels take others is refused
# when it loads, so a signature drift between a backend and the routers cannot go unseen.
KERNEL_ARGUMENTS: dict[str, tuple[str, ...]] = {
    "softmax": ("x", "dim", "dtype", "log"),
    "softmax_backward": ("grad", "output", "dim", "input_dtype", "log"),
    "logsumexp": ("x", "dim", "keepdim"),
    "logsumexp_backward": ("grad", "x", "lse", "dim"),
    "cross_entropy": ("logits", "target", "weight", "smoothing"),
    "cross_entropy_backward": ("logits", "target", "weight", "terms"),
    "cross_entropy_backward_inplace": ("logits", "target", "weight", "terms"),
    "cross_entropy_loss": (
        "logits",
        "target",
        "weight",
        "ignore_index",
        "label_smoothing",
        "z_loss",
        "reduction",
    ),
    "cross_entropy_loss_backward": (
        "grad_loss",
        "grad_lse",
        "logits",
        "target",
        "weight",
        "lse",
        "counts",
        "ignore_index",
        "label_smoothing",
        "z_loss",
        "reduction",
    ),
    "masked_softmax": ("x", "mask", "scale", "causal_offset", "dtype", "mode", "masked_rows"),
    "masked_softmax_backward": ("grad", "output", "lse", "scale", "log", "input_dtype"),
    "linear_cross_entropy": (
        "input",
        "linear_weight",
        "linear_bias",
        "target",
        "weight",
        "softcap",
        "temperature",
        "smoothing",
    ),
    "cross_entropy_tile": (
        "logits",
        "target",
        "class_start",
        "weight",
        "softcap",
        "temperature",
        "smoothing",
        "entropy",
        "state",
    ),
    "cross_entropy_tile_backward": (
        "logits",
        "target",
        "class_start",
        "weight",
        "terms",
        "softcap",
        "temperature",
        "grad_entropy",
    ),
}


def argument_names(kernel: Callable) -> tuple[str, ...]:
    """The argument names of a Python function or of a custom op (its schema)."""
    if isinstance(kernel, torch._ops.OpOverloadPacket):
        kernel = kernel.default
    if isinstance(kernel, torch._ops.OpOverload):
        return tuple(a.name for a in kernel._schema.arguments)
    return tuple(inspect.signature(kernel).parameters)


def check_kernels(name: str, kernels: Kernels) -> Kernels:
    """``kernels`` if it meets the contract, else TypeError naming the backend and kernel."""
    if not isinstance(kernels, Kernels):
        raise TypeError(f"backend {name!r} provides {type(kernels).__name__}, not Kernels")
    for field in fields(Kernels):
        kernel = getattr(kernels, field.name)
        if kernel is None and field.default is None:  # an optional kernel not provided
            continue
        got = argument_names(kernel)
        if got != KERNEL_ARGUMENTS[field.name]:
            raise TypeError(
                f"backend {name!r}: kernel {field.name} takes {got}, the contract says "
                f"{KERNEL_ARGUMENTS[field.name]}"
            )
    return kernels
