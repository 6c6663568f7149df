"""The masked ops: softmax, log_softmax and logsumexp of ``t = scale * x + mask`` along the
last dim (docs/masked_softmax.md), with the public options' checks, the ops' schemas,
routers, fake kernels, autograd rules, vmap rules and autocast rules::

    masked_softmax(Tensor x, Tensor? mask, float scale, int? causal_offset,
                   ScalarType? dtype, bool log, int masked_rows, str backend)
                   -> (Tensor y, Tensor lse)
    masked_softmax_backward(Tensor grad, Tensor output, Tensor lse, float scale, bool log,
                            ScalarType input_dtype, str backend) -> Tensor
    masked_logsumexp(Tensor x, Tensor? mask, float scale, int? causal_offset,
                     int masked_rows, str backend) -> (Tensor out, Tensor lse)

``masked_rows`` is the public argument of that name as a ``MaskedRows`` value
(stablekernels/_masked.py: ZERO for "zero", NAN for "nan"). Each op is one call of its
backend's kernel (the forward's ``mode`` a ``MaskedMode``), with nothing computed around it.

The public functions are :func:`stablekernels.softmax`, :func:`~stablekernels.log_softmax` and
:func:`~stablekernels.logsumexp` with ``scale``, ``mask`` or ``causal``.
"""

from __future__ import annotations

import torch

from .. import backends
from .._api import _check_int
from .._masked import MaskedMode, MaskedRows
from .._numerics import accumulation_dtype
from ._checks import (
    FLOATING_DTYPES,
    _check_same_shape,
    _kernels,
    check_floating,
    check_same_device,
)
from ._library import (
    _acc,
    _eligible,
    _not_written,
    _per_sample_rule,
    _row_sum,
    call_op,
    no_context,
    register,
    register_fused_fake,
)

# ----------------------------------------------------------------------------------------
# The public functions' masked options.


def _masked_options(op: str, x: torch.Tensor, dims, scale, mask, causal, causal_offset,
                    masked_rows):  # fmt: skip
    """The masked op's ``(mask, scale, causal_offset, masked_rows)`` (the last a
    MaskedRows), or None when none of scale, mask and causal is given (the plain op serves
    the call)."""
    if masked_rows not in ("zero", "nan"):
        raise ValueError(f"{op}(): masked_rows must be 'zero' or 'nan', got {masked_rows!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"{op}(): argument 'causal' must be bool, not {type(causal).__name__}")
    if mask is not None and not isinstance(mask, torch.Tensor):
        raise TypeError(f"{op}(): argument 'mask' must be Tensor, not {type(mask).__name__}")
    causal_offset = _check_int(op, "causal_offset", causal_offset)
    if scale is None and mask is None and not causal:
        return None
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"{op}(): argument 'scale' must be float, not {type(scale).__name__}")
    last = max(x.dim() - 1, 0)
    if tuple(dims) != (last,):
        raise NotImplementedError(
            f"{op}(): scale, mask and causal apply along the last dim only; got dim "
            f"{dims[0] if len(dims) == 1 else tuple(dims)} of a {x.dim()}-dim input (move that "
            "dim last first, e.g. x.movedim(dim, -1))"
        )
    return (
        mask,
        1.0 if scale is None else float(scale),
        causal_offset if causal else None,
        MaskedRows.of(masked_rows),
    )


def _unmasked(scale, mask, causal, causal_offset, masked_rows) -> bool:
    """The masked options at their defaults (or valid and unused): the plain op serves."""
    return (
        scale is None
        and mask is None
        and causal is False
        and type(causal_offset) is int
        and masked_rows in ("zero", "nan")
    )


# ----------------------------------------------------------------------------------------
# Masked softmax, log_softmax and logsumexp along the last dim (docs/masked_softmax.md):
# t = scale * x + mask (additive) or -inf where a bool mask is False or, causally, where
# j > i + causal_offset (i the row's index along x's dim -2). A row with nothing kept is 0
# (softmax), -inf (log_softmax, logsumexp) or, with masked_rows NAN, NaN (the kernel fills
# it); its gradient is 0. The ops' lse output (float64, x's shape without its last dim) is
# -inf on such rows whatever masked_rows says: the backward kernel finds them there.


def _check_masked(op, x, mask):
    check_floating(op, "the input", x.dtype)
    if mask is None:
        return
    check_same_device(op, x, mask)
    if mask.dtype != torch.bool and mask.dtype not in FLOATING_DTYPES:
        raise RuntimeError(
            f"{op}(): mask must be bool (True keeps) or floating (added), got {mask.dtype}"
        )
    try:
        shape = torch.broadcast_shapes(mask.shape, x.shape)
    except RuntimeError:
        shape = None
    if shape != x.shape:
        raise RuntimeError(
            f"{op}(): mask of shape {tuple(mask.shape)} cannot be broadcast to the input's "
            f"shape {tuple(x.shape)}"
        )


def _check_masked_rows(op, masked_rows):
    if masked_rows not in tuple(MaskedRows):
        raise ValueError(
            f"{op}(): masked_rows must be a MaskedRows value (0: 'zero', 1: 'nan'), got "
            f"{masked_rows!r}"
        )


def _masked_kernel(op, backend, x, mask):
    kernels = _kernels(op, backend, x, *(() if mask is None else (mask,)))
    if kernels.masked_softmax is None:
        raise backends.BackendUnavailableError(
            f"{op}(): the {backend} backend has no masked softmax kernel"
        )
    return kernels.masked_softmax


def _masked_call(op, backend, x, mask, scale, causal_offset, dtype, mode, masked_rows):
    """The kernel's (y, lse) on x as rows along its last dim (0-dim as one row of one); lse
    shaped as x without its last dim (y as the kernel returns it). An additive mask is
    converted to the accumulation dtype before it is expanded (a view), so no mask-sized copy
    is made."""
    kernel = _masked_kernel(op, backend, x, mask)
    rows_shape = x.shape[:-1]
    if x.dim() == 0:
        x = x.reshape(1)
        mask = None if mask is None else mask.reshape(1)
    if mask is not None:
        if mask.dtype != torch.bool:
            mask = mask.to(accumulation_dtype(x.dtype, dtype))
        mask = mask.expand(x.shape)
    y, lse = kernel(
        x.contiguous(), mask, float(scale), causal_offset, dtype, mode, MaskedRows(masked_rows)
    )
    return y, lse.view(rows_shape)


def _masked_softmax_family():
    op = "masked_softmax"

    def route(x, mask, scale, causal_offset, dtype, log, masked_rows, backend):
        _check_masked(op, x, mask)
        _check_masked_rows(op, masked_rows)
        out_dtype = x.dtype if dtype is None else dtype
        check_floating(op, "the requested dtype", out_dtype)
        if x.numel() == 0:
            _masked_kernel(op, backend, x, mask)
            return (
                torch.empty(x.shape, dtype=out_dtype, device=x.device),
                torch.empty(x.shape[:-1], dtype=torch.float64, device=x.device),
            )
        mode = MaskedMode.LOG_SOFTMAX if log else MaskedMode.SOFTMAX
        y, lse = _masked_call(
            op, backend, x, mask, scale, causal_offset, out_dtype, mode, masked_rows
        )
        return y.view(x.shape), lse

    def fake(x, mask, scale, causal_offset, dtype, log, masked_rows, backend):
        _check_masked(op, x, mask)
        _check_masked_rows(op, masked_rows)
        out_dtype = x.dtype if dtype is None else dtype
        check_floating(op, "the requested dtype", out_dtype)
        return x.new_empty(x.shape, dtype=out_dtype), x.new_empty(x.shape[:-1], dtype=torch.float64)

    return route, fake


def _masked_softmax_backward_check(grad, output, lse, input_dtype):
    op = "masked_softmax_backward"
    check_floating(op, "the output", output.dtype)
    check_floating(op, "the input dtype", input_dtype)
    check_same_device(op, output, grad, lse)
    _check_same_shape(op, grad, output)
    if lse.shape != output.shape[:-1]:
        raise RuntimeError(
            f"{op}(): lse has shape {tuple(lse.shape)}, expected {tuple(output.shape[:-1])} "
            "(the output's shape without its last dim)"
        )


def _masked_softmax_backward_route(grad, output, lse, scale, log, input_dtype, backend):
    """scale * (softmax or log_softmax backward of y), 0 on dropped elements (log_softmax:
    where y is -inf) and on rows with nothing kept (lse -inf): one call of the backend's
    masked backward kernel (no mask read), on grad and y as one dtype, contiguous, at least
    1-D, and the lse as float64 rows."""
    op = "masked_softmax_backward"
    _masked_softmax_backward_check(grad, output, lse, input_dtype)
    kernels = _kernels(op, backend, output, grad, lse)
    if kernels.masked_softmax_backward is None:
        raise backends.BackendUnavailableError(
            f"{op}(): the {backend} backend has no masked softmax backward kernel"
        )
    if output.numel() == 0:
        return output.new_empty(output.shape, dtype=input_dtype)
    # One dtype, contiguous (autograd hands over expanded grads, e.g. of sum()).
    if grad.dtype != output.dtype:
        grad = grad.to(output.dtype)
    shape = output.shape
    if output.dim() == 0:  # one row of one
        grad, output = grad.reshape(1), output.reshape(1)
    lse = lse.to(torch.float64).reshape(-1).contiguous()
    dx = kernels.masked_softmax_backward(
        grad.contiguous(), output.contiguous(), lse, float(scale), log, input_dtype
    )
    return dx.view(shape)


def _masked_softmax_backward_fake(grad, output, lse, scale, log, input_dtype, backend):
    _masked_softmax_backward_check(grad, output, lse, input_dtype)
    return output.new_empty(output.shape, dtype=input_dtype)


def _masked_logsumexp_route(x, mask, scale, causal_offset, masked_rows, backend):
    """The kernel's logsumexp mode: (out in x's dtype, lse float64), both x's shape without
    its last dim, from one call."""
    op = "masked_logsumexp"
    _check_masked(op, x, mask)
    _check_masked_rows(op, masked_rows)
    if x.numel() == 0:
        _masked_kernel(op, backend, x, mask)
        shape = x.shape[:-1]
        return (
            torch.full(shape, float("-inf"), dtype=x.dtype, device=x.device),
            torch.full(shape, float("-inf"), dtype=torch.float64, device=x.device),
        )
    out, lse = _masked_call(
        op, backend, x, mask, scale, causal_offset, x.dtype, MaskedMode.LOGSUMEXP, masked_rows
    )
    return out.view(lse.shape), lse


def _masked_logsumexp_fake(x, mask, scale, causal_offset, masked_rows, backend):
    _check_masked("masked_logsumexp", x, mask)
    _check_masked_rows("masked_logsumexp", masked_rows)
    return x.new_empty(x.shape[:-1]), x.new_empty(x.shape[:-1], dtype=torch.float64)


# ----------------------------------------------------------------------------------------
# masked_softmax: inputs (x, mask, scale, causal_offset, dtype, log, masked_rows, backend),
# outputs (y, lse); masked_logsumexp: inputs (x, mask, scale, causal_offset, masked_rows,
# backend), outputs (out, lse). With t = scale * x + mask, dt/dx = scale and, for an additive
# mask, dt/dmask = 1 (summed over the dims the mask is broadcast along). Dropped elements
# and rows with nothing kept have no derivative (0). The backward op has no derivative of
# its own: double backward and forward-over-reverse raise.


def _mask_gradient(mask, dt):
    """The gradient of an additive mask from dt (x-shaped): summed to the mask's shape."""
    return dt.sum_to_size(mask.shape).to(mask.dtype)


def _masked_softmax_setup(ctx, inputs, output):
    x, mask, scale, _causal, _dtype, log, _masked_rows, backend = inputs
    y, lse = output
    ctx.save_for_backward(y, lse, mask)
    ctx.save_for_forward(y, lse)
    ctx.scale, ctx.log, ctx.input_dtype, ctx.backend = scale, log, x.dtype, backend
    ctx.set_materialize_grads(False)


def _masked_softmax_vjp(ctx, g, g_lse):
    y, lse, mask = ctx.saved_tensors
    none = (None,) * 6
    if g is None and g_lse is None:
        return (None, None) + none
    # (call, x, mask, ...)
    mask_asked = ctx.needs_input_grad[2]
    if g_lse is None and not mask_asked:
        dx = call_op(
            "masked_softmax_backward", g, y, lse, ctx.scale, ctx.log, ctx.input_dtype, ctx.backend
        )
        return dx, None, *none
    # dt: the gradient along t = scale * x + mask; the lse's is p = softmax(t).
    acc = accumulation_dtype(ctx.input_dtype, y.dtype)
    if g is None:
        dt = torch.zeros_like(y, dtype=acc)
    else:
        dt = call_op("masked_softmax_backward", g, y, lse, 1.0, ctx.log, acc, ctx.backend)
    if g_lse is not None:
        p = torch.exp(_acc(y)) if ctx.log else _acc(y)
        g_rows = g_lse.to(acc).unsqueeze(-1) if y.dim() else g_lse.to(acc)
        dt = dt + torch.where(p > 0, p * g_rows, 0.0)  # 0 where dropped, dead or NaN
    dmask = _mask_gradient(mask, dt) if mask_asked else None
    return (dt * ctx.scale).to(ctx.input_dtype), dmask, *none


def _masked_tangent(ctx_scale, tx, tmask, like):
    """The tangent of t = scale * x + mask, in the accumulation dtype of ``like``."""
    acc = accumulation_dtype(like.dtype)
    tt = torch.zeros_like(like, dtype=acc) if tx is None else tx.to(acc) * ctx_scale
    if tmask is not None:
        tt = tt + tmask.to(acc)
    return tt


def _masked_softmax_jvp(ctx, tx, tmask, *_):
    y, lse = ctx.saved_tensors
    tt = _masked_tangent(ctx.scale, tx, tmask, y)
    dead = (lse == float("-inf")).unsqueeze(-1) if y.dim() else lse == float("-inf")
    if ctx.log:
        p = torch.exp(_acc(y))
        t_lse = _row_sum(torch.where(p > 0, p * tt, 0.0), -1)
        out = torch.where((y == float("-inf")) | dead, 0.0, tt - t_lse)
    else:
        ya = _acc(y)
        t_lse = _row_sum(torch.where(ya > 0, ya * tt, 0.0), -1)
        out = torch.where(dead, 0.0, ya * (tt - t_lse))
    t_lse = torch.where(dead, 0.0, t_lse)
    return out.to(y.dtype), (t_lse.squeeze(-1) if y.dim() else t_lse).to(lse.dtype)


def _masked_logsumexp_setup(ctx, inputs, output):
    x, mask, scale, causal_offset, _masked_rows, backend = inputs
    ctx.save_for_backward(x, mask)
    ctx.save_for_forward(x, mask)
    ctx.scale, ctx.causal_offset, ctx.backend = scale, causal_offset, backend
    ctx.set_materialize_grads(False)


def _masked_probabilities(ctx, x, mask):
    """softmax of t in the accumulation dtype (0 where dropped and on rows with nothing
    kept), by the forward op: the mask read again, the row's statistics recomputed."""
    acc = accumulation_dtype(x.dtype)
    zero = MaskedRows.ZERO
    return call_op(
        "masked_softmax", x, mask, ctx.scale, ctx.causal_offset, acc, False, zero, ctx.backend
    )[0]


def _masked_logsumexp_vjp(ctx, g, g_lse):
    x, mask = ctx.saved_tensors
    none = (None,) * 4
    if g is None and g_lse is None:
        return (None, None) + none
    g = g_lse if g is None else (g if g_lse is None else g + g_lse)
    p = _masked_probabilities(ctx, x, mask)
    dt = g.to(p.dtype).unsqueeze(-1) * p if x.dim() else g.to(p.dtype) * p
    dmask = _mask_gradient(mask, dt) if ctx.needs_input_grad[2] else None
    return (dt * ctx.scale).to(x.dtype), dmask, *none


def _masked_logsumexp_jvp(ctx, tx, tmask, *_):
    x, mask = ctx.saved_tensors
    p = _masked_probabilities(ctx, x, mask)
    tt = _masked_tangent(ctx.scale, tx, tmask, x)
    t_lse = torch.where(p > 0, p * tt, 0.0).sum(-1) if x.dim() else torch.where(p > 0, p * tt, 0.0)
    return t_lse.to(x.dtype), t_lse.double()


# ----------------------------------------------------------------------------------------
# Autocast (CUDA): a float32 result (masked_softmax), a float32 input (masked_logsumexp).


def _masked_float32_result(x, mask, scale, causal_offset, dtype, *rest):
    if dtype is None and _eligible(x):
        dtype = torch.float32
    return x, mask, scale, causal_offset, dtype, *rest


def _masked_float32_input(x, *rest):
    return (x.float() if _eligible(x) else x), *rest


# ----------------------------------------------------------------------------------------
# Registration. vmap: one call per sample (the causal index is a row's place along dim -2,
# the mask broadcast against each sample).

register(
    "masked_softmax",
    "masked_softmax(Tensor x, Tensor? mask, float scale, int? causal_offset, "
    "ScalarType? dtype, bool log, int masked_rows, str backend) -> (Tensor y, Tensor lse)",
    *_masked_softmax_family(),
    autograd=(_masked_softmax_setup, _masked_softmax_vjp, _masked_softmax_jvp),
    vmap=_per_sample_rule("masked_softmax"),
    autocast={"cuda": _masked_float32_result},
)
register(
    "masked_softmax_backward",
    "masked_softmax_backward(Tensor grad, Tensor output, "
    "Tensor lse, float scale, bool log, ScalarType input_dtype, str backend) -> Tensor",
    _masked_softmax_backward_route,
    _masked_softmax_backward_fake,
    autograd=(
        no_context,
        _not_written("a derivative of the gradient (double backward)", "masked_softmax"),
        _not_written("forward-mode AD of the gradient", "masked_softmax"),
    ),
    vmap=_per_sample_rule("masked_softmax_backward"),
)
register(
    "masked_logsumexp",
    "masked_logsumexp(Tensor x, Tensor? mask, float scale, "
    "int? causal_offset, int masked_rows, str backend) -> (Tensor out, Tensor lse)",
    _masked_logsumexp_route,
    _masked_logsumexp_fake,
    autograd=(_masked_logsumexp_setup, _masked_logsumexp_vjp, _masked_logsumexp_jvp),
    vmap=_per_sample_rule("masked_logsumexp"),
    autocast={"cuda": _masked_float32_input},
)


def _fused_masked_softmax_fake(x, mask, scale, causal_offset, dtype, mode, masked_rows):
    rows = x.numel() // x.shape[-1]
    shape = x.shape
    if mode == MaskedMode.STATISTICS:  # (comparisons, not a lookup: mode may be symbolic)
        shape = (0,)
    elif mode == MaskedMode.LOGSUMEXP:
        shape = (rows,)
    return x.new_empty(shape, dtype=dtype), x.new_empty(rows, dtype=torch.float64)


register_fused_fake("_fused_masked_softmax", _fused_masked_softmax_fake)
register_fused_fake(
    "_fused_masked_softmax_backward",
    lambda grad, output, lse, scale, log, input_dtype: output.new_empty(
        output.shape, dtype=input_dtype
    ),
)
