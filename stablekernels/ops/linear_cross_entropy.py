"""linear_cross_entropy and its backward op: the ops' schemas, routers, fake kernels,
autograd rules, vmap rules and autocast rules (the public functions ``linear_cross_entropy``
and ``linear_logprobs``, their torch checks, reductions and the class-probability path:
:mod:`stablekernels._linear_cross_entropy`)::

    linear_cross_entropy(Tensor input, Tensor linear_weight, Tensor? linear_bias,
                         Tensor target, Tensor? weight, int ignore_index,
                         float label_smoothing, float z_loss, float? softcap,
                         float temperature, bool with_entropy, bool with_gradient,
                         str backend)
        -> (Tensor loss, Tensor lse, Tensor entropy, Tensor logprob, Tensor unit_grad_input,
            Tensor unit_grad_linear_weight, Tensor unit_grad_linear_bias)
    linear_cross_entropy_backward(Tensor grad_loss, Tensor grad_lse, Tensor grad_entropy,
                                  Tensor grad_logprob, Tensor input, Tensor linear_weight,
                                  Tensor? linear_bias, Tensor target, Tensor? weight,
                                  Tensor lse, Tensor row_entropy, int ignore_index,
                                  float label_smoothing, float z_loss, float? softcap,
                                  float temperature, bool with_entropy, str backend)
        -> (Tensor grad_input, Tensor grad_linear_weight, Tensor grad_linear_bias)

vmap runs one call per sample (each sample its own tiled problem, whose weights may differ
per sample). Autocast (CPU and CUDA): both ops run with autocast off inside (their Autocast
kernels change no argument), so that the tiles' matmuls stay in the accumulation dtype
instead of being cast to the autocast dtype.
"""

from __future__ import annotations

import torch

from .. import _linear_tiles
from .._numerics import accumulation_dtype, split_lse
from ..backends import torch_ce
from ._checks import _kernels, check_floating, check_same_device
from ._library import (
    _FLOAT32_LOSS_DEVICES,
    _as_given,
    _not_written,
    _per_sample_rule,
    call_op,
    no_context,
    register,
    register_fused_fake,
)
from .cross_entropy import _check_row_targets, _class_rows, _refuse_weight_derivative

# ----------------------------------------------------------------------------------------
# Linear cross-entropy of (R, H) inputs, (V, H) linear weights (and (V,) bias) and (R,) class
# targets, the logits never materialised (stablekernels._linear_tiles): per-row losses as
# cross_entropy's, lse (fp64), entropy (empty unless asked for) and the target's log-prob.
# With ``with_gradient`` the forward also returns the gradient of sum(loss) (every row's
# gradient 1; empty tensors otherwise), which the autograd rule scales when the caller
# reduces the loss by a sum or a mean and differentiates nothing else: one matmul less.


def check_linear_problem(op, input, linear_weight, linear_bias, weight, softcap, temperature):
    """The checks every linear cross-entropy path shares (input (rows, H), linear_weight
    (V, H), linear_bias (V,), class weights (V,), the logit transform), in torch's words
    where torch has them; returns the tensors, for the one-device check."""
    if input.dim() != 2 or linear_weight.dim() != 2 or input.shape[1] != linear_weight.shape[1]:
        raise RuntimeError(
            f"{op}(): input must be (rows, H) and linear_weight (V, H), got "
            f"{tuple(input.shape)} and {tuple(linear_weight.shape)}"
        )
    check_floating(op, "the input", input.dtype)
    check_floating(op, "linear_weight", linear_weight.dtype)
    tensors = [input, linear_weight]
    if linear_bias is not None:
        if linear_bias.shape != linear_weight.shape[:1]:
            raise RuntimeError(
                f"{op}(): linear_bias must have shape ({linear_weight.shape[0]},), got "
                f"{tuple(linear_bias.shape)}"
            )
        check_floating(op, "linear_bias", linear_bias.dtype)
        tensors.append(linear_bias)
    if weight is not None:
        check_floating(op, "the weight", weight.dtype)
        if weight.shape != linear_weight.shape[:1]:
            raise RuntimeError(
                f"weight tensor should be defined either for all {linear_weight.shape[0]} "
                f"classes or no classes but got weight tensor of shape: {list(weight.shape)}"
            )
        tensors.append(weight)
    if softcap is not None and not (softcap > 0 and softcap < float("inf")):
        raise ValueError(f"{op}(): softcap must be a positive finite number or None, got {softcap}")
    if not (temperature > 0 and temperature < float("inf")):
        raise ValueError(f"{op}(): temperature must be a positive finite number, got {temperature}")
    return tensors


def _check_linear_cross_entropy(op, input, linear_weight, linear_bias, target, weight, options):
    softcap, temperature, *flags = options
    if flags == [True, True]:
        raise ValueError(f"{op}(): with_entropy and with_gradient exclude each other")
    tensors = check_linear_problem(
        op, input, linear_weight, linear_bias, weight, softcap, temperature
    )
    _check_row_targets(op, target, input.shape[0])
    check_same_device(op, *tensors, target)


def linear_accumulation_dtype(input, linear_weight, linear_bias) -> torch.dtype:
    """The dtype of the logits and of every intermediate: float64 if any of the three is,
    else float32 (mixed dtypes, as autocast leaves them, are computed in it too)."""
    bias = () if linear_bias is None else (linear_bias.dtype,)
    return accumulation_dtype(input.dtype, linear_weight.dtype, *bias)


def _linear_cross_entropy_route(
    input,
    linear_weight,
    linear_bias,
    target,
    weight,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    temperature,
    with_entropy,
    with_gradient,
    backend,
):
    op = "linear_cross_entropy"
    _check_linear_cross_entropy(
        op,
        input,
        linear_weight,
        linear_bias,
        target,
        weight,
        (softcap, temperature, with_entropy, with_gradient),
    )
    kernels = _kernels(op, backend, input)
    rows, vocab = input.shape[0], linear_weight.shape[0]
    acc = linear_accumulation_dtype(input, linear_weight, linear_bias)
    safe, counted, w = _class_rows(vocab, acc, target, weight, ignore_index)
    if rows == 0 or vocab == 0:
        # With no classes every row is ignored (a counted row is reported above): as
        # cross_entropy, the smoothing term is then (e / 0) * 0 = NaN, the rest 0.
        lse = input.new_full((rows,), float("-inf"), dtype=torch.float64)
        loss = torch.full_like(lse, float("nan") if label_smoothing else 0.0, dtype=acc)
        entropy = torch.full_like(loss[: rows if with_entropy else 0], float("nan"))
        gradient = _unit_gradient_shapes(input, linear_weight, linear_bias, with_gradient, acc)
        return loss, lse, entropy, torch.zeros_like(loss), *(g.zero_() for g in gradient)
    logits = _linear_tiles.Logits(linear_weight, linear_bias, softcap, temperature, acc)
    if with_gradient:
        unit_terms = _unit_terms(safe, counted, w, vocab, label_smoothing, z_loss, acc)
        nll, smooth, lse, dx, dw, db = _linear_tiles.forward_with_gradient(
            kernels, input, logits, safe, counted, w, label_smoothing > 0, unit_terms
        )
        entropy = input.new_empty(0, dtype=acc)
        gradient = (dx, dw, input.new_empty(0, dtype=acc) if db is None else db)
    else:
        nll, smooth, lse, entropy = _linear_tiles.forward(
            kernels, input, logits, safe, counted, w, label_smoothing > 0, with_entropy
        )
        gradient = _unit_gradient_shapes(input, linear_weight, linear_bias, False, acc)
    w_t = 1.0 if w is None else w.double().index_select(0, safe)
    loss = torch_ce.row_loss(nll, smooth, lse, counted, w_t, vocab, label_smoothing, z_loss)
    logprob = torch.where(counted, -nll, 0.0)
    return loss.to(acc), lse, entropy.to(acc), logprob.to(acc), *gradient


def _unit_terms(safe, counted, w, vocab, e, z, acc):
    """``unit_terms(lse_rows, r)``: the per-row terms (hi, lo, coef, smooth, one_hot) of
    ``torch_ce.per_row_backward_terms`` for a per-row gradient of 1 (0 on the rows that do
    not count) of the rows ``r``, from their lse. What does not depend on the lse is made
    once per call (coef without its z-loss term in float64, smooth and one_hot in ``acc``),
    so that a row chunk adds only the lse's split and the z-loss term (the same values as
    per_row_backward_terms: coef rounded once from float64)."""
    g = torch.where(counted, 1.0, 0.0).double()
    w_t = 1.0 if w is None else w.double().index_select(0, safe)
    total_w = float(vocab) if w is None else w.double().sum()
    coef = g * ((1 - e) * w_t + (e * total_w / vocab if e else 0.0))
    fixed = torch.stack([((e / vocab) * g).to(acc), ((1 - e) * g * w_t).to(acc)], 1)

    def unit_terms(lse_rows, r):
        terms = fixed.new_empty(r.stop - r.start, 5)
        terms[:, 0], terms[:, 1] = split_lse(lse_rows, acc)
        terms[:, 2] = coef[r] + g[r] * (2 * z) * lse_rows if z else coef[r]
        terms[:, 3:] = fixed[r]
        return terms

    return unit_terms


def _unit_gradient_shapes(input, linear_weight, linear_bias, with_gradient, acc):
    """New tensors of the shapes of the forward's gradient outputs: those of input,
    linear_weight and linear_bias (empty without a bias) in ``acc``, or all empty."""
    if not with_gradient:
        return tuple(input.new_empty(0, dtype=acc) for _ in range(3))
    bias_shape = (0,) if linear_bias is None else linear_bias.shape
    return (
        input.new_empty(input.shape, dtype=acc),
        input.new_empty(linear_weight.shape, dtype=acc),
        input.new_empty(bias_shape, dtype=acc),
    )


def _linear_cross_entropy_fake(*args):
    """The outputs' shapes and dtypes (arguments as the router's)."""
    input, linear_weight, linear_bias, target, weight = args[:5]
    softcap, temperature, with_entropy, with_gradient = args[8:12]
    _check_linear_cross_entropy(
        "linear_cross_entropy", input, linear_weight, linear_bias, target, weight,
        (softcap, temperature, with_entropy, with_gradient),
    )  # fmt: skip
    rows = input.shape[0]
    acc = linear_accumulation_dtype(input, linear_weight, linear_bias)
    return (
        input.new_empty(rows, dtype=acc),
        input.new_empty(rows, dtype=torch.float64),
        input.new_empty(rows if with_entropy else 0, dtype=acc),
        input.new_empty(rows, dtype=acc),
        *_unit_gradient_shapes(input, linear_weight, linear_bias, with_gradient, acc),
    )


def _linear_cross_entropy_backward_route(
    grad_loss,
    grad_lse,
    grad_entropy,
    grad_logprob,
    input,
    linear_weight,
    linear_bias,
    target,
    weight,
    lse,
    row_entropy,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    temperature,
    with_entropy,
    backend,
):
    """The per-row terms of torch_ce.per_row_backward_terms, with the target's log-prob
    (d/dz_j = [j == t] - p_j) and the entropy's p_j part (dH/dz_j = -p_j (z_j - lse + H))
    folded into coef and one_hot; the tiles add the entropy's -g_H p_j (z_j - lse)."""
    op = "linear_cross_entropy_backward"
    _check_linear_cross_entropy(
        op, input, linear_weight, linear_bias, target, weight, (softcap, temperature)
    )
    kernels = _kernels(op, backend, input, grad_loss, grad_lse, grad_logprob, lse)
    rows, vocab = input.shape[0], linear_weight.shape[0]
    no_bias = input.new_empty(0)
    if rows == 0 or vocab == 0:
        bias = None if linear_bias is None else torch.zeros_like(linear_bias)
        return (
            torch.zeros_like(input),
            torch.zeros_like(linear_weight),
            no_bias if bias is None else bias,
        )
    acc = linear_accumulation_dtype(input, linear_weight, linear_bias)
    safe, counted, w = _class_rows(vocab, acc, target, weight, ignore_index)
    terms = torch_ce.per_row_backward_terms(
        grad_loss, grad_lse, lse, safe, counted, w, vocab, label_smoothing, z_loss, acc
    )
    g_logprob = torch.where(counted, grad_logprob.to(acc), 0.0)
    terms[:, 2] -= g_logprob
    terms[:, 4] -= g_logprob
    g_entropy = None
    if with_entropy:
        g_entropy = grad_entropy.to(acc)
        terms[:, 2] -= g_entropy * row_entropy.to(acc)
    logits = _linear_tiles.Logits(linear_weight, linear_bias, softcap, temperature, acc)
    dx, dw, db = _linear_tiles.backward(kernels, input, logits, safe, counted, w, terms, g_entropy)
    db = no_bias if db is None else db.to(linear_bias.dtype)
    return dx.to(input.dtype), dw.to(linear_weight.dtype), db


def _linear_cross_entropy_backward_fake(*args):
    """The gradients' shapes and dtypes (arguments as the router's)."""
    input, linear_weight, linear_bias, target, weight = args[4:9]
    softcap, temperature = args[14:16]
    _check_linear_cross_entropy(
        "linear_cross_entropy_backward", input, linear_weight, linear_bias, target, weight,
        (softcap, temperature),
    )  # fmt: skip
    bias = input.new_empty(0) if linear_bias is None else torch.empty_like(linear_bias)
    return torch.empty_like(input), torch.empty_like(linear_weight), bias


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


# ----------------------------------------------------------------------------------------
# Registration.

register(
    "linear_cross_entropy",
    "linear_cross_entropy(Tensor input, Tensor linear_weight, "
    "Tensor? linear_bias, Tensor target, Tensor? weight, int ignore_index, "
    "float label_smoothing, float z_loss, float? softcap, float temperature, "
    "bool with_entropy, bool with_gradient, str backend) "
    "-> (Tensor loss, Tensor lse, Tensor entropy, Tensor logprob, Tensor unit_grad_input, "
    "Tensor unit_grad_linear_weight, Tensor unit_grad_linear_bias)",
    _linear_cross_entropy_route,
    _linear_cross_entropy_fake,
    autograd=(
        _linear_cross_entropy_setup,
        _linear_cross_entropy_vjp,
        _not_written("forward-mode AD"),
    ),
    vmap=_per_sample_rule("linear_cross_entropy"),
    autocast={device: _as_given for device in _FLOAT32_LOSS_DEVICES},
)
register(
    "linear_cross_entropy_backward",
    "linear_cross_entropy_backward(Tensor grad_loss, "
    "Tensor grad_lse, Tensor grad_entropy, Tensor grad_logprob, Tensor input, "
    "Tensor linear_weight, Tensor? linear_bias, Tensor target, Tensor? weight, Tensor lse, "
    "Tensor row_entropy, int ignore_index, float label_smoothing, float z_loss, "
    "float? softcap, float temperature, bool with_entropy, str backend) "
    "-> (Tensor grad_input, Tensor grad_linear_weight, Tensor grad_linear_bias)",
    _linear_cross_entropy_backward_route,
    _linear_cross_entropy_backward_fake,
    autograd=(
        no_context,
        _not_written("a derivative of the gradient (double backward)"),
        _not_written("forward-mode AD of the gradient"),
    ),
    vmap=_per_sample_rule("linear_cross_entropy_backward"),
    autocast={device: _as_given for device in _FLOAT32_LOSS_DEVICES},
)
register_fused_fake(
    "_fused_cross_entropy_tile",
    lambda logits, target, class_start, weight, softcap, temperature, smoothing, entropy, state: (
        None
    ),
)
register_fused_fake(
    "_fused_cross_entropy_tile_backward",
    lambda logits, target, class_start, weight, terms, softcap, temperature, grad_entropy: None,
)
