"""Autograd of every op of :mod:`stablekernels._ops`: reverse mode, forward mode and the
torch.func transforms, the backward ops included (so gradients of gradients, Hessians and
forward-over-reverse all work).

Each op's Autograd kernel is an ``autograd.Function`` with ``setup_context`` (so that
``torch.func.grad``/``jacrev``/``hessian`` accept it), ``backward``, ``jvp`` (forward mode:
``torch.func.jvp``/``jacfwd``, ``forward_ad``) and ``generate_vmap_rule`` (its forward,
backward and jvp run under ``vmap`` through the batching rules of
:mod:`stablekernels._batching`). The op itself stays one opaque node for ``torch.compile``
and ``torch.export``; the Function is what autograd runs. Formulas (p = softmax, t a
tangent, g a cotangent, all along ``dim``)::

    softmax      vjp  y * (g - sum(g * y))          jvp  y * (t - sum(t * y))  (the same map)
    log_softmax  vjp  g - p * sum(g)                jvp  t - sum(p * t)
    logsumexp    vjp  g * p                         jvp  sum(p * t)
    cross_entropy     docs/design.md

The backward ops are linear in their incoming gradient, so their derivative along it is the
backward op itself (one fused pass); the terms from the saved forward values are plain torch
ops, which are differentiable again. Everything runs on the backend of the forward (an
argument of every op). Class weights of cross-entropy are not differentiable, as in torch's
nll_loss: a weight that requires grad raises at the backward (never a silent zero
gradient), and a weight's forward-mode tangent is not used (torch ignores it too).
"""

from __future__ import annotations

import torch
from torch._C._functorch import TransformType
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
from torch._functorch.utils import enable_single_level_autograd_function
from torch.autograd import forward_ad

from ._numerics import accumulation_dtype, probabilities
from ._ops import (
    ROUTERS,
    _lib,
    cross_entropy_row_tangent,
    linear_accumulation_dtype,
    ops,
)
from .backends import torch_ce


def _acc(t: torch.Tensor) -> torch.Tensor:
    return t.to(accumulation_dtype(t.dtype))


def _row_sum(t: torch.Tensor, dim: int) -> torch.Tensor:
    return t.sum(dim, keepdim=True)


# ----------------------------------------------------------------------------------------
# softmax and log_softmax: inputs (x, dim, dtype, backend), output y.


def _softmax_setup(ctx, inputs, output):
    x, dim, _dtype, backend = inputs
    ctx.save_for_backward(output)
    ctx.save_for_forward(output)
    ctx.dim, ctx.input_dtype, ctx.backend = dim, x.dtype, backend


def _softmax_vjp(ctx, g):
    (y,) = ctx.saved_tensors
    return (
        call_op("softmax_backward", g, y, ctx.dim, ctx.input_dtype, ctx.backend),
        None,
        None,
        None,
    )


def _softmax_jvp(ctx, t, *_):
    # The Jacobian diag(y) - y y^T is symmetric: the jvp is the backward kernel's map.
    (y,) = ctx.saved_tensors
    return call_op("softmax_backward", t, y, ctx.dim, y.dtype, ctx.backend)


def _log_softmax_vjp(ctx, g):
    (y,) = ctx.saved_tensors
    return (
        call_op("log_softmax_backward", g, y, ctx.dim, ctx.input_dtype, ctx.backend),
        None,
        None,
        None,
    )


def _log_softmax_jvp(ctx, t, *_):
    (y,) = ctx.saved_tensors
    ta = _acc(t)
    return (ta - _row_sum(torch.exp(_acc(y)) * ta, ctx.dim)).to(y.dtype)


# ----------------------------------------------------------------------------------------
# logsumexp: inputs (x, dim, keepdim, backend), outputs (out in x.dtype, lse in float64).


class _Rows:
    """How a logsumexp-shaped (reduced) tensor lines up with x: ``expand`` gives it x's
    rank (size 1 along dim), ``reduce`` sums an x-shaped tensor into the reduced shape."""

    def __init__(self, x: torch.Tensor, dim: int, keepdim: bool):
        self.dim = None if x.dim() == 0 else dim
        self.keepdim = keepdim

    def expand(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.dim is None or self.keepdim else t.unsqueeze(self.dim)

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.dim is None else t.sum(self.dim, keepdim=self.keepdim)


def _logsumexp_setup(ctx, inputs, output):
    x, dim, keepdim, backend = inputs
    ctx.save_for_backward(x, output[1])
    ctx.save_for_forward(x, output[1])
    ctx.dim, ctx.keepdim, ctx.backend = dim, keepdim, backend


def _logsumexp_vjp(ctx, g, g_lse):
    x, lse = ctx.saved_tensors
    # Both outputs are the same quantity; a gradient may reach either.
    if g is None:
        g = g_lse.to(x.dtype)
    elif g_lse is not None:
        g = g + g_lse
    dx = call_op("logsumexp_backward", g, x, lse, ctx.dim, ctx.keepdim, ctx.backend)
    return dx, None, None, None


def _logsumexp_jvp(ctx, t, *_):
    x, lse = ctx.saved_tensors
    rows = _Rows(x, ctx.dim, ctx.keepdim)
    dot = rows.reduce(probabilities(x, rows.expand(lse)) * _acc(t))
    return dot.to(x.dtype), dot.to(torch.float64)


# ----------------------------------------------------------------------------------------
# The backward ops of softmax and log_softmax: inputs (grad, y, dim, input_dtype, backend).


def _softmax_backward_setup(ctx, inputs, output):
    grad, y, dim, input_dtype, backend = inputs
    ctx.save_for_backward(grad, y)
    ctx.save_for_forward(grad, y)
    ctx.dim, ctx.input_dtype, ctx.backend = dim, input_dtype, backend


def _softmax_backward_y_term(g, y, dy, dim):
    """d/dy of dx = y * (g - sum(g * y)), applied to dy (in the accumulation dtype)."""
    return dy * (g - _row_sum(g * y, dim)) - y * _row_sum(g * dy, dim)


def _softmax_backward_vjp(ctx, gg):
    # dx = y*g - y*sum(g*y): along g the map is softmax_backward itself (symmetric); the
    # transpose of the map along y is gg*(g - sum(g*y)) - g*sum(gg*y).
    g, y = ctx.saved_tensors
    d_g = call_op("softmax_backward", gg, y, ctx.dim, g.dtype, ctx.backend)
    gga, ya, ga = _acc(gg), _acc(y), _acc(g)
    d_y = gga * (ga - _row_sum(ga * ya, ctx.dim)) - ga * _row_sum(gga * ya, ctx.dim)
    return d_g, d_y.to(y.dtype), None, None, None


def _softmax_backward_jvp(ctx, t_g, t_y, *_):
    g, y = ctx.saved_tensors
    out = 0
    if t_g is not None:
        out = call_op("softmax_backward", t_g, y, ctx.dim, ctx.input_dtype, ctx.backend)
    if t_y is not None:
        out = out + _softmax_backward_y_term(_acc(g), _acc(y), _acc(t_y), ctx.dim)
    return out.to(ctx.input_dtype)


def _log_softmax_backward_vjp(ctx, gg):
    # dx = g - exp(y) * sum(g):  d/dg: gg - sum(gg * exp(y));  d/dy: -gg * exp(y) * sum(g)
    g, y = ctx.saved_tensors
    gga, p, ga = _acc(gg), torch.exp(_acc(y)), _acc(g)
    d_g = gga - _row_sum(gga * p, ctx.dim)
    d_y = -gga * p * _row_sum(ga, ctx.dim)
    return d_g.to(g.dtype), d_y.to(y.dtype), None, None, None


def _log_softmax_backward_jvp(ctx, t_g, t_y, *_):
    g, y = ctx.saved_tensors
    out = 0
    if t_g is not None:
        out = call_op("log_softmax_backward", t_g, y, ctx.dim, ctx.input_dtype, ctx.backend)
    if t_y is not None:
        p = torch.exp(_acc(y))
        out = out - p * _acc(t_y) * _row_sum(_acc(g), ctx.dim)
    return out.to(ctx.input_dtype)


# ----------------------------------------------------------------------------------------
# logsumexp's backward op: inputs (grad, x, lse, dim, keepdim, backend), dx = g * p.


def _logsumexp_backward_setup(ctx, inputs, output):
    grad, x, lse, dim, keepdim, backend = inputs
    ctx.save_for_backward(grad, x, lse)
    ctx.save_for_forward(grad, x, lse)
    ctx.dim, ctx.keepdim, ctx.backend = dim, keepdim, backend


def _logsumexp_backward_vjp(ctx, gg):
    #   d/dg: sum(gg * p)      d/dx: gg * g * p      d/dlse: -sum(gg * g * p)
    g, x, lse = ctx.saved_tensors
    rows = _Rows(x, ctx.dim, ctx.keepdim)
    p, gga = probabilities(x, rows.expand(lse)), _acc(gg)
    d_x = gga * rows.expand(_acc(g)) * p
    d_g = rows.reduce(gga * p)
    d_lse = -rows.reduce(d_x)
    return d_g.to(g.dtype), d_x.to(x.dtype), d_lse.to(lse.dtype), None, None, None


def _logsumexp_backward_jvp(ctx, t_g, t_x, t_lse, *_):
    g, x, lse = ctx.saved_tensors
    rows = _Rows(x, ctx.dim, ctx.keepdim)
    p = probabilities(x, rows.expand(lse))
    out = 0
    if t_g is not None:
        out = rows.expand(_acc(t_g)) * p
    shift = 0
    if t_x is not None:
        shift = _acc(t_x)
    if t_lse is not None:
        shift = shift - rows.expand(t_lse).to(p.dtype)
    out = out + rows.expand(_acc(g)) * p * shift
    return out.to(x.dtype)


# ----------------------------------------------------------------------------------------
# cross_entropy: inputs (logits, target, weight, ignore_index, label_smoothing, z_loss,
# reduction, backend), outputs (loss per row or reduced, lse per row, counts). The options
# after (logits, target, weight) are passed on to the backward op in the same order, so a
# new option needs nothing here. counts (what "mean" divides by) is not differentiable.


def _refuse_weight_derivative(asked: bool) -> None:
    if asked:
        raise RuntimeError(
            "cross_entropy(): the loss is not differentiable with respect to the class "
            "weights (as torch's nll_loss); pass a weight that does not require grad"
        )


def _cross_entropy_setup(ctx, inputs, output):
    logits, target, weight = inputs[:3]
    ctx.save_for_backward(logits, target, weight, output[1], output[2])
    ctx.save_for_forward(logits, target, weight, output[1], output[2])
    ctx.mark_non_differentiable(output[2])
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zeros made
    ctx.options = tuple(inputs[3:])


def _cross_entropy_vjp(ctx, grad_loss, grad_lse, _grad_counts):
    saved = ctx.saved_tensors  # (logits, target, weight, lse, counts): the backward's order
    logits, lse = saved[0], saved[3]
    _refuse_weight_derivative(ctx.needs_input_grad[3])  # (call, logits, target, weight, ...)
    if grad_loss is None:
        reduction = ctx.options[3]
        shape = lse.shape if reduction == "none" else ()
        grad_loss = lse.new_zeros(shape, dtype=accumulation_dtype(logits.dtype))
    dx = call_op("cross_entropy_backward", grad_loss, grad_lse, *saved, *ctx.options)
    return (dx, None, None) + (None,) * len(ctx.options)


def _reduce_tangent(rows_ce, rows_z, counted, counts, reduction):
    """The tangent of the loss output from the rows' ce and z tangents (stablekernels/
    backends/torch_ce.py: the same reduction as the loss)."""
    if reduction == "none":
        return rows_ce + rows_z
    if reduction == "sum":
        return (rows_ce + rows_z).sum()
    ce = rows_ce.sum() / counts[0].to(rows_ce.dtype)
    return ce + rows_z.sum() / counts[1].to(rows_z.dtype)


def _cross_entropy_jvp(ctx, t_logits, *_):
    logits, target, weight, lse, counts = ctx.saved_tensors
    ignore_index, label_smoothing, z_loss, reduction, _backend = ctx.options
    acc = accumulation_dtype(logits.dtype)
    if t_logits is None:
        t_logits = torch.zeros_like(logits)
    ce, z, d, counted = cross_entropy_row_tangent(
        logits, _acc(t_logits), target, weight, lse, ignore_index, label_smoothing, z_loss, acc
    )
    loss = _reduce_tangent(ce, z, counted, counts, reduction)
    return loss, d, None


# cross_entropy_backward: inputs (grad_loss, grad_lse, logits, target, weight, lse, counts,
# ignore_index, label_smoothing, z_loss, reduction, backend). With p = exp(x - lse) per row,
#   dx_c = p_c coef - smooth w_c - [c == t] one_hot,
#   coef = g_ce ((1 - e) w_t + e W / C) + g_z 2 z lse + grad_lse
# (g_ce, g_z: the loss's gradient on a row's ce and z terms, 0 on rows that do not count;
# csrc/include/stablekernels/cross_entropy_rows.h); dx is linear in (grad_loss, grad_lse):
# its derivative along them is the op itself.


def _cross_entropy_backward_setup(ctx, inputs, output):
    grad_loss, grad_lse, logits, target, weight, lse, counts = inputs[:7]
    ctx.grad_lse_given = grad_lse is not None
    if grad_lse is None:
        grad_lse = torch.zeros_like(lse)
    ctx.save_for_backward(grad_loss, grad_lse, logits, target, weight, lse, counts)
    ctx.save_for_forward(grad_loss, grad_lse, logits, target, weight, lse, counts)
    ctx.options = tuple(inputs[7:])


def _cross_entropy_backward_rows(ctx):
    """(p, coef, 2 z g_z) of the saved inputs, in the accumulation dtype; p is (R, C), the
    others (R, 1)."""
    grad_loss, grad_lse, logits, target, weight, lse, counts = ctx.saved_tensors
    ignore_index, label_smoothing, z_loss, reduction, _backend = ctx.options
    acc = accumulation_dtype(logits.dtype)
    g_ce, g_z, counted = torch_ce.row_gradients(grad_loss, target, counts, ignore_index, reduction)
    w_t = (
        1.0 if weight is None else weight.double().index_select(0, torch.where(counted, target, 0))
    )
    coef = torch_ce.backward_terms(
        g_ce, g_z, grad_lse, lse, w_t, counts[2], logits.shape[1], label_smoothing, z_loss, acc
    )[:, 2]
    z_term = ((2 * z_loss) * g_z).expand(lse.shape)
    p = probabilities(logits, lse[:, None])
    return p, coef[:, None], z_term.to(acc)[:, None]


def _cross_entropy_backward_vjp(ctx, gg):
    grad_loss, grad_lse, logits, target, weight, lse, counts = ctx.saved_tensors
    _refuse_weight_derivative(ctx.needs_input_grad[5])  # (call, grad_loss, ..., weight, ...)
    p, coef, z_term = _cross_entropy_backward_rows(ctx)
    gp = _acc(gg) * p
    q = gp.sum(1)
    # dx's derivative along grad_loss paired with gg: the op's map, transposed.
    unit = call_op(
        "cross_entropy_backward",
        torch.ones_like(grad_loss),
        None,
        logits,
        target,
        weight,
        lse,
        counts,
        *ctx.options,
    )
    d_grad_loss = (_acc(gg) * _acc(unit)).sum(1)
    if grad_loss.dim() == 0:
        d_grad_loss = d_grad_loss.sum()
    d_logits = gp * coef
    d_lse = q * (z_term - coef)[:, 0]
    return (
        d_grad_loss.to(grad_loss.dtype),
        q.to(grad_lse.dtype) if ctx.grad_lse_given else None,
        d_logits.to(logits.dtype),
        None,
        None,
        d_lse.to(lse.dtype),
        None,
    ) + (None,) * len(ctx.options)


def _cross_entropy_backward_jvp(
    ctx, t_grad_loss, t_grad_lse, t_logits, _t, _t_weight, t_lse, _t_counts, *_
):
    grad_loss, grad_lse, logits, target, weight, lse, counts = ctx.saved_tensors
    out = 0
    if t_grad_loss is not None or t_grad_lse is not None:
        out = call_op(
            "cross_entropy_backward",
            torch.zeros_like(grad_loss) if t_grad_loss is None else t_grad_loss,
            t_grad_lse,
            logits,
            target,
            weight,
            lse,
            counts,
            *ctx.options,
        )
    if t_logits is not None or t_lse is not None:
        p, coef, z_term = _cross_entropy_backward_rows(ctx)
        shift = 0
        if t_logits is not None:
            shift = _acc(t_logits) * coef
        if t_lse is not None:
            shift = shift + t_lse.to(p.dtype)[:, None] * (z_term - coef)
        out = out + p * shift
    return out.to(logits.dtype)


# ----------------------------------------------------------------------------------------
# linear_cross_entropy: inputs (input, linear_weight, linear_bias, target, weight, options...),
# outputs (loss, lse, entropy, logprob) per row. Reverse mode only: its backward op has no
# derivative of its own, and forward mode is not written; both refuse with an error.


def _linear_cross_entropy_setup(ctx, inputs, output):
    input, linear_weight, linear_bias, target, weight = inputs[:5]
    _, lse, entropy, _, *unit_gradient = output
    ctx.save_for_backward(
        input, linear_weight, linear_bias, target, weight, lse, entropy, *unit_gradient
    )
    # The backward op's options are the forward's but with_gradient (inputs[11]).
    ctx.options = tuple(inputs[5:11]) + tuple(inputs[12:])
    ctx.with_gradient = inputs[11]
    ctx.set_materialize_grads(False)  # an output not differentiated arrives as None


def _scaled_unit_gradient(ctx, grad_loss, others):
    """The forward's gradient of sum(loss) scaled by the per-row gradient, which a sum or a
    mean makes the same for every row (checked, without waiting for the device)."""
    input, linear_weight, linear_bias, target, *_, unit_dx, unit_dw, unit_db = ctx.saved_tensors
    if any(g is not None for g in others):
        raise RuntimeError(
            "stablekernels::linear_cross_entropy with with_gradient=True: only its loss "
            "output may be differentiated"
        )
    if input.shape[0] == 0:
        scale = counted = None
    else:
        first = grad_loss[0]
        same = (grad_loss == first) | (grad_loss.isnan() & first.isnan())
        torch._assert_async(
            same.all(), "linear_cross_entropy(with_gradient=True): per-row gradients differ"
        )
        counted = target != ctx.options[0]
        scale = first.to(unit_dx.dtype)
    if scale is None:
        dx, dw, db = unit_dx, unit_dw, unit_db
    else:
        # Rows not counted have no gradient (0, not 0 * inf), nor has the weight without
        # any counted row, as when the gradient is computed in the backward.
        dx = torch.where(counted[:, None], unit_dx * scale, 0.0)
        scale = torch.where(counted.any(), scale, 0.0)
        if torch.is_grad_enabled():  # create_graph: recorded, so out of place
            dw, db = unit_dw * scale, unit_db * scale
        else:
            # In place: the weight's gradient is the size of the weight (a second copy would
            # double the peak). A second backward through the same graph (retain_graph) then
            # finds the saved tensor modified and raises, as autograd does for such tensors.
            dw, db = unit_dw.mul_(scale), unit_db.mul_(scale)
    db = None if linear_bias is None else db.to(linear_bias.dtype)
    return dx.to(input.dtype), dw.to(linear_weight.dtype), db


def _linear_cross_entropy_vjp(ctx, grad_loss, grad_lse, grad_entropy, grad_logprob, *grad_units):
    input, linear_weight, linear_bias, target, weight, lse, entropy = ctx.saved_tensors[:7]
    # The forward's gradient (empty unless with_gradient), differentiated:
    if ctx.with_gradient and any(g is not None for g in grad_units):
        _not_written("a derivative of the gradient (double backward)")()
    # (call, input, linear_weight, linear_bias, target, weight, ...)
    _refuse_weight_derivative(ctx.needs_input_grad[5])
    none = (None,) * (3 + len(ctx.options))
    if ctx.with_gradient:
        if grad_loss is None:
            return (None, None, None) + none
        return _scaled_unit_gradient(ctx, grad_loss, (grad_lse, grad_entropy, grad_logprob)) + none
    acc = linear_accumulation_dtype(input, linear_weight, linear_bias)
    grads = [grad_loss, grad_lse, grad_entropy, grad_logprob]
    for i, like in enumerate((lse.to(acc), lse, entropy, lse.to(acc))):
        if grads[i] is None:
            grads[i] = torch.zeros_like(like)
    dx, dw, db = call_op(
        "linear_cross_entropy_backward",
        *grads,
        input,
        linear_weight,
        linear_bias,
        target,
        weight,
        lse,
        entropy,
        *ctx.options,
    )
    return (dx, dw, None if linear_bias is None else db) + none


def _not_written(what: str, op: str = "linear_cross_entropy"):
    def refuse(*_args):
        raise NotImplementedError(
            f"stablekernels::{op}: {what} is not supported (only first-order "
            "reverse mode: .backward(), torch.autograd.grad, torch.func.grad/vjp)"
        )

    return refuse


def _linear_cross_entropy_backward_setup(ctx, inputs, output):
    pass


# ----------------------------------------------------------------------------------------
# Registration: one autograd.Function per op, run by the op's Autograd kernel.

# ----------------------------------------------------------------------------------------
# masked_softmax: inputs (x, mask, scale, causal_offset, dtype, log, nan_rows, backend),
# outputs (y, lse); masked_logsumexp: inputs (x, mask, scale, causal_offset, nan_rows,
# backend), outputs (out, lse). With t = scale * x + mask, dt/dx = scale and, for an additive
# mask, dt/dmask = 1 (summed over the dims the mask is broadcast along). Dropped elements
# and rows with nothing kept have no derivative (0). The backward op has no derivative of
# its own: double backward and forward-over-reverse raise.


def _mask_gradient(mask, dt):
    """The gradient of an additive mask from dt (x-shaped): summed to the mask's shape."""
    return dt.sum_to_size(mask.shape).to(mask.dtype)


def _masked_softmax_setup(ctx, inputs, output):
    x, mask, scale, _causal, _dtype, log, _nan_rows, backend = inputs
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
    x, mask, scale, causal_offset, _nan_rows, backend = inputs
    ctx.save_for_backward(x, mask)
    ctx.save_for_forward(x, mask)
    ctx.scale, ctx.causal_offset, ctx.backend = scale, causal_offset, backend
    ctx.set_materialize_grads(False)


def _masked_probabilities(ctx, x, mask):
    """softmax of t in the accumulation dtype (0 where dropped and on rows with nothing
    kept), by the forward op: the mask read again, the row's statistics recomputed."""
    acc = accumulation_dtype(x.dtype)
    return call_op(
        "masked_softmax", x, mask, ctx.scale, ctx.causal_offset, acc, False, False, ctx.backend
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


_BELOW_AUTOGRAD = torch._C._after_autograd_keyset


class _Call:
    """What a Function's forward needs of the call it runs: the dispatch keys and the grad
    modes at the call."""

    def __init__(self, keyset):
        self.keyset = keyset
        self.grad_enabled = torch.is_grad_enabled()
        self.fwd_grad_enabled = torch._C._is_fwd_grad_enabled()


# The Function's forward of a call that call_op sends straight to the router.
DIRECT = _Call.__new__(_Call)
DIRECT.keyset = None

_RULES = {
    "softmax": (_softmax_setup, _softmax_vjp, _softmax_jvp),
    "log_softmax": (_softmax_setup, _log_softmax_vjp, _log_softmax_jvp),
    "logsumexp": (_logsumexp_setup, _logsumexp_vjp, _logsumexp_jvp),
    "softmax_backward": (_softmax_backward_setup, _softmax_backward_vjp, _softmax_backward_jvp),
    "log_softmax_backward": (
        _softmax_backward_setup,
        _log_softmax_backward_vjp,
        _log_softmax_backward_jvp,
    ),
    "logsumexp_backward": (
        _logsumexp_backward_setup,
        _logsumexp_backward_vjp,
        _logsumexp_backward_jvp,
    ),
    "cross_entropy": (_cross_entropy_setup, _cross_entropy_vjp, _cross_entropy_jvp),
    "cross_entropy_backward": (
        _cross_entropy_backward_setup,
        _cross_entropy_backward_vjp,
        _cross_entropy_backward_jvp,
    ),
    "linear_cross_entropy": (
        _linear_cross_entropy_setup,
        _linear_cross_entropy_vjp,
        _not_written("forward-mode AD"),
    ),
    "linear_cross_entropy_backward": (
        _linear_cross_entropy_backward_setup,
        _not_written("a derivative of the gradient (double backward)"),
        _not_written("forward-mode AD of the gradient"),
    ),
    "masked_softmax": (_masked_softmax_setup, _masked_softmax_vjp, _masked_softmax_jvp),
    "masked_softmax_backward": (
        _linear_cross_entropy_backward_setup,
        _not_written("a derivative of the gradient (double backward)", "masked_softmax"),
        _not_written("forward-mode AD of the gradient", "masked_softmax"),
    ),
    "masked_logsumexp": (
        _masked_logsumexp_setup,
        _masked_logsumexp_vjp,
        _masked_logsumexp_jvp,
    ),
}


def _refuse_forward_over_forward(name: str) -> None:
    """A jvp formula runs with forward mode off, so a second forward-mode level around this
    one (jacfwd(jacfwd(f)), jvp of jvp) would not see its terms: refuse rather than return
    a wrong derivative. Forward-over-reverse (torch.func.hessian) is unaffected."""
    levels = [i for i in retrieve_all_functorch_interpreters() if i.key() == TransformType.Jvp]
    if len(levels) > 1 or forward_ad._current_level > 0:
        raise NotImplementedError(
            f"stablekernels::{name}: forward-mode AD nested in forward-mode AD (e.g. "
            "jacfwd(jacfwd(f))) is not supported; use jacfwd(jacrev(f)) "
            "(torch.func.hessian) or jacrev(jacrev(f))"
        )


def _function(name: str, setup_context, backward, jvp) -> type[torch.autograd.Function]:
    """The autograd.Function of op ``name``, applied as ``apply(call, *args)``: its forward
    redispatches the op below autograd with the grad modes of the call (a Function's forward
    runs with both off, but a torch.func level below this one must still see them on to
    record its own graph, as it does for torch's ops)."""
    op = getattr(ops, name).default

    route = ROUTERS[name]

    def forward(call, *args):
        if call is DIRECT:  # applied by call_op: nothing below autograd but the router
            return route(*args)
        with (
            torch._C._AutoDispatchBelowAutograd(),
            torch.autograd.grad_mode.set_grad_enabled(call.grad_enabled),
            forward_ad._set_fwd_grad_enabled(call.fwd_grad_enabled),
        ):
            return op.redispatch(call.keyset & _BELOW_AUTOGRAD, *args)

    def setup(ctx, inputs, output):
        setup_context(ctx, inputs[1:], output)

    def vjp(ctx, *grads):
        return (None, *backward(ctx, *grads))

    def forward_mode(ctx, _call_tangent, *tangents):
        _refuse_forward_over_forward(name)
        return jvp(ctx, *tangents)

    title = "".join(part.title() for part in name.split("_"))
    return type(
        f"{title}Function",
        (torch.autograd.function._SingleLevelFunction,),
        {
            "__doc__": f"Autograd of stablekernels::{name} (module doc).",
            "forward": staticmethod(forward),
            "setup_context": staticmethod(setup),
            "backward": staticmethod(vjp),
            "jvp": staticmethod(forward_mode),
        },
    )


# Dispatch keys below autograd that leave a call to the router alone: the view-tracking key
# (a fallthrough for these ops) and the plain CPU/CUDA backends, whose kernel the router is.
_PASSTHROUGH = torch._C.DispatchKeySet(torch._C.DispatchKey.ADInplaceOrView)
_PLAIN_BACKENDS = (torch._C.DispatchKey.CPU, torch._C.DispatchKey.CUDA)


def _goes_to_router(keyset) -> bool:
    """Whether redispatching below autograd would reach the op's router with nothing in
    between (no tensor subclass, fake tensor, functionalization or tracing mode): then the
    router is called directly, which saves a round trip through the dispatcher."""
    below = (keyset & _BELOW_AUTOGRAD) - _PASSTHROUGH
    return below.highestPriorityTypeId() in _PLAIN_BACKENDS


def _needs_autograd(args) -> bool:
    """Whether a call must go through its Function: a gradient may be asked for, a
    forward-mode level is open, or a torch.func transform is running."""
    return (
        (torch.is_grad_enabled() and torch._C._any_requires_grad(*args))
        or forward_ad._current_level >= 0
        or torch._C._are_functorch_transforms_active()
    )


FUNCTIONS: dict[str, type[torch.autograd.Function]] = {}


def _register(name: str) -> None:
    function = FUNCTIONS[name] = _function(name, *_RULES[name])
    op = getattr(ops, name).default
    route = ROUTERS[name]

    def autograd_kernel(keyset, *args):
        if _needs_autograd(args):
            # Applied at this dispatcher level: under a torch.func transform the inputs
            # are that level's wrappers, and the Function builds that level's graph, as
            # the autograd kernels of torch's own ops do.
            with enable_single_level_autograd_function():
                return function.apply(_Call(keyset), *args)
        if _goes_to_router(keyset):
            return route(*args)
        return op.redispatch(keyset & _BELOW_AUTOGRAD, *args)

    _lib.impl(name, autograd_kernel, "Autograd", with_keyset=True)


for _name in _RULES:
    _register(_name)


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_is_legacy_batched = torch._C._functorch.is_legacy_batchedtensor


def direct(args) -> bool:
    """Whether a call may skip the dispatcher: eager, plain CPU or CUDA tensors, and nothing
    that would see or change the op on its way (torch.compile or export tracing, a torch.func
    transform or autograd's batched gradients, forward-mode AD, autocast, a dispatch or
    torch-function mode, a tensor subclass). Then the op's Autograd kernel would do exactly
    what call_op does."""
    if (
        _is_compiling()
        or _functorch_active()
        or forward_ad._current_level >= 0
        or _autocast_enabled()
        or _dispatch_modes()
        or _function_modes()
    ):
        return False
    for a in args:
        if isinstance(a, torch.Tensor) and (
            type(a) not in _PLAIN_TENSORS
            or not (a.is_cpu or a.is_cuda)
            or _is_legacy_batched(a)  # autograd's batched gradients (is_grads_batched)
        ):
            return False
    return True


_is_compiling = torch.compiler.is_compiling
_functorch_active = torch._C._are_functorch_transforms_active
_autocast_enabled = torch._C._is_any_autocast_enabled
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_modes = torch._C._is_torch_function_mode_enabled


def call_op(name: str, *args):
    """``torch.ops.stablekernels.<name>(*args)``, through its Function or straight to its
    router when :func:`direct` allows: the same computation without the dispatcher's round
    trip into the Python Autograd kernel (about 5 us a call on a CPU). The public functions
    and the backward rules call their ops through here."""
    if not direct(args):
        return getattr(ops, name).default(*args)
    if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
        return FUNCTIONS[name].apply(DIRECT, *args)
    return ROUTERS[name](*args)
