"""Autograd of the ops of :mod:`stablekernels._ops`, the backward ops included, so that the
backward is itself differentiable (gradgradcheck holds). The formulas::

    softmax      dx = y * (dy - sum(dy * y))
    log_softmax  dx = dy - exp(y) * sum(dy)
    logsumexp    dx = dy * exp(x - lse)
    cross_entropy: docs/design.md

The backward ops run on the backend of the forward (saved in the context). The derivatives
of the backward ops are written in plain torch ops, so they are differentiable again.
"""

from __future__ import annotations

import torch

from ._numerics import accumulation_dtype
from ._ops import NAMESPACE, _lib, ops

# ----------------------------------------------------------------------------------------
# Autograd of the forward ops.


def _save_output(ctx, inputs, output):
    x, dim, _dtype, backend = inputs
    ctx.save_for_backward(output)
    ctx.dim, ctx.input_dtype, ctx.backend = dim, x.dtype, backend


def _softmax_grad(ctx, grad):
    (y,) = ctx.saved_tensors
    return ops.softmax_backward(grad, y, ctx.dim, ctx.input_dtype, ctx.backend), None, None, None


def _log_softmax_grad(ctx, grad):
    (y,) = ctx.saved_tensors
    dx = ops.log_softmax_backward(grad, y, ctx.dim, ctx.input_dtype, ctx.backend)
    return dx, None, None, None


def _logsumexp_setup(ctx, inputs, output):
    x, dim, keepdim, backend = inputs
    ctx.save_for_backward(x, output[1])
    ctx.dim, ctx.keepdim, ctx.backend = dim, keepdim, backend


def _logsumexp_grad(ctx, grad, grad_lse):
    x, lse = ctx.saved_tensors
    # Both outputs are the same quantity; a gradient may reach either.
    if grad_lse is not None:
        grad = grad + grad_lse
    dx = ops.logsumexp_backward(grad, x, lse, ctx.dim, ctx.keepdim, ctx.backend)
    return dx, None, None, None


# ----------------------------------------------------------------------------------------
# Autograd of the backward ops (double backward), in plain torch ops so it is
# differentiable again. ``gg`` is the gradient flowing into dx.


def _acc(t: torch.Tensor) -> torch.Tensor:
    return t.to(accumulation_dtype(t.dtype))


def _save_backward_inputs(ctx, inputs, output):
    grad, y, dim, input_dtype, backend = inputs
    ctx.save_for_backward(grad, y)
    ctx.dim, ctx.backend = dim, backend


def _softmax_backward_grad(ctx, gg):
    # dx = y*dy - y*sum(dy*y)
    #   d/d dy:  y * (gg - sum(gg*y))                 (softmax_backward again)
    #   d/d y:   gg * (dy - sum(dy*y)) - dy * sum(gg*y)
    dy, y = ctx.saved_tensors
    dim = ctx.dim
    d_dy = ops.softmax_backward(gg.to(y.dtype), y, dim, dy.dtype, ctx.backend)
    g, yf, dyf = _acc(gg), _acc(y), _acc(dy)
    d_y = g * (dyf - (dyf * yf).sum(dim, keepdim=True)) - dyf * (g * yf).sum(dim, keepdim=True)
    return d_dy, d_y.to(y.dtype), None, None, None


def _log_softmax_backward_grad(ctx, gg):
    # dx = dy - exp(y) * sum(dy)
    #   d/d dy:  gg - sum(gg * exp(y))
    #   d/d y:   -gg * exp(y) * sum(dy)
    dy, y = ctx.saved_tensors
    dim = ctx.dim
    g, p, dyf = _acc(gg), torch.exp(_acc(y)), _acc(dy)
    d_dy = g - (g * p).sum(dim, keepdim=True)
    d_y = -g * p * dyf.sum(dim, keepdim=True)
    return d_dy.to(dy.dtype), d_y.to(y.dtype), None, None, None


def _logsumexp_backward_setup(ctx, inputs, output):
    grad, x, result, dim, keepdim, backend = inputs
    ctx.save_for_backward(grad, x, result)
    ctx.dim, ctx.keepdim = dim, keepdim


def _logsumexp_backward_grad(ctx, gg):
    # dx = dy * p with p = exp(x - lse)
    #   d/d dy:  sum(gg * p)      d/d x: gg * dy * p      d/d lse: -sum(gg * dy * p)
    dy, x, lse = ctx.saved_tensors
    dim, keepdim = ctx.dim, ctx.keepdim
    if x.dim() == 0:
        dim = None
    dyf, lsef = _acc(dy), _acc(lse)
    if not keepdim and dim is not None:
        dyf, lsef = dyf.unsqueeze(dim), lsef.unsqueeze(dim)
    g = _acc(gg)
    p = torch.exp(_acc(x) - lsef)
    d_x = g * dyf * p

    def reduce(t):
        return t if dim is None else t.sum(dim, keepdim=keepdim)

    return (
        reduce(g * p).to(dy.dtype),
        d_x.to(x.dtype),
        (-reduce(d_x)).to(lse.dtype),
        None,
        None,
        None,
    )


def _cross_entropy_setup(ctx, inputs, output):
    # The non-tensor inputs after (logits, target, weight) are the options, passed on to the
    # backward op as they are: cross_entropy_backward takes them in the same order, so a new
    # option of the op needs nothing here.
    logits, target, weight = inputs[:3]
    ctx.save_for_backward(logits, target, weight, output[1])
    ctx.options = tuple(inputs[3:])


def _cross_entropy_grad(ctx, grad_loss, grad_lse):
    # No gradient for the targets or the class weights (torch has none for weight either).
    logits, target, weight, lse = ctx.saved_tensors
    if grad_loss is None:
        grad_loss = lse.new_zeros(lse.shape, dtype=accumulation_dtype(logits.dtype))
    if grad_lse is None:
        grad_lse = torch.zeros_like(lse)
    dx = ops.cross_entropy_backward(grad_loss, grad_lse, logits, target, weight, lse, *ctx.options)
    return (dx, None, None) + (None,) * len(ctx.options)


_AUTOGRAD = {
    "softmax": (_softmax_grad, _save_output),
    "log_softmax": (_log_softmax_grad, _save_output),
    "logsumexp": (_logsumexp_grad, _logsumexp_setup),
    "softmax_backward": (_softmax_backward_grad, _save_backward_inputs),
    "log_softmax_backward": (_log_softmax_backward_grad, _save_backward_inputs),
    "logsumexp_backward": (_logsumexp_backward_grad, _logsumexp_backward_setup),
    "cross_entropy": (_cross_entropy_grad, _cross_entropy_setup),
}
for _name, (_backward, _setup) in _AUTOGRAD.items():
    torch.library.register_autograd(
        f"{NAMESPACE}::{_name}", _backward, setup_context=_setup, lib=_lib
    )
