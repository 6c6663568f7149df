"""cross_entropy of (R, C) logits and (R,) class targets and its backward op: the ops'
schemas, routers, fake kernels, autograd rules, vmap rules and autocast rule (the public
function, its torch checks, shapes, reductions and the class-probability path:
:mod:`stablekernels._cross_entropy`)::

    cross_entropy(Tensor logits, Tensor target, Tensor? weight, int ignore_index,
                  float label_smoothing, float z_loss, str reduction, str backend)
                  -> (Tensor loss, Tensor lse, Tensor counts)
    cross_entropy_backward(Tensor grad_loss, Tensor? grad_lse, Tensor logits, Tensor target,
                           Tensor? weight, Tensor lse, Tensor counts, int ignore_index,
                           float label_smoothing, float z_loss, str reduction,
                           str backend) -> Tensor

The router computes the cross-entropy loss of each row from the kernel's pieces (nll,
smooth, lse) and the options (ignore_index, class weights, label smoothing, z-loss), where a
backend has no fused loss kernel; the loss, reduction and backward coefficients are
otherwise the kernels' own. A new per-row option of cross-entropy therefore changes this
module and the public function only (docs/design.md). Formulas: docs/design.md.

Class weights are not differentiable, as in torch's nll_loss: a weight that requires grad
raises at the backward (never a silent zero gradient), and a weight's forward-mode tangent
is not used (torch ignores it too).
"""

from __future__ import annotations

import torch

from .._numerics import accumulation_dtype, probabilities
from ..backends import torch_ce
from ._checks import _kernels, check_floating, check_reduction, check_same_device
from ._library import (
    _FLOAT32_LOSS_DEVICES,
    _acc,
    _eligible,
    _front,
    _per_sample,
    call_op,
    ops,
    register,
    register_fused_fake,
)

# ----------------------------------------------------------------------------------------
# Cross-entropy of (R, C) logits and (R,) class targets: per-row losses (fp32, fp64 for fp64
# logits; weighted and smoothed, 0 on ignored rows) and per-row lse (fp64). Reduction and
# shapes: stablekernels._cross_entropy. Formulas: docs/design.md.


def _check_row_targets(op, target, rows: int) -> None:
    if target.dtype != torch.int64 or target.shape != (rows,):
        raise RuntimeError(
            f"{op}(): target must be int64 of shape ({rows},), got {target.dtype} "
            f"{tuple(target.shape)}"
        )


def _check_cross_entropy(op, logits, target, weight):
    if logits.dim() != 2:
        raise RuntimeError(f"{op}(): logits must be 2-D (rows, classes), got {tuple(logits.shape)}")
    check_floating(op, "the logits", logits.dtype)
    _check_row_targets(op, target, logits.shape[0])
    if weight is not None:
        check_floating(op, "the weight", weight.dtype)
        if weight.shape != logits.shape[1:]:
            raise RuntimeError(f"{op}(): weight must have shape ({logits.shape[1]},)")
        check_same_device(op, logits, target, weight)
    else:
        check_same_device(op, logits, target)


def _class_rows(classes: int, dtype: torch.dtype, target, weight, ignore_index):
    """What the linear cross-entropy's tiles are given: targets (an ignored row's is 0),
    which rows count (each counted target checked: torch_ce.check_targets), and the class
    weights in the accumulation dtype."""
    counted = torch_ce.check_targets(target, ignore_index, classes)
    return (
        torch.where(counted, target, 0),
        counted,
        _class_weights(weight, accumulation_dtype(dtype)),
    )


def counted_targets(target, ignore_index):
    """(safe, counted): which rows count (target != ignore_index), and the targets with
    an ignored row's set to 0, a class every kernel may read."""
    counted = target != ignore_index
    return torch.where(counted, target, 0), counted


def cross_entropy_row_tangent(
    logits, tangent, target, weight, lse, ignore_index, label_smoothing, z_loss, acc
):
    """The forward-mode derivative of each row's loss terms and lse along ``tangent`` (the
    logits' tangent, in ``acc``), from the saved lse: with p = exp(x - lse) and
    d = sum_c p_c t_c,

        d lse = d,   d ce = (1 - e) w_t (d - t_t) + (e / C) (W d - sum_c w_c t_c),
        d (z lse^2) = 2 z lse d

    (cross_entropy_rows.h, term by term); NaN where lse is not finite, 0 on rows that do
    not count. Returns (ce tangent, z tangent, in ``acc``; lse tangent in float64;
    counted)."""
    rows, classes = logits.shape
    safe, counted = counted_targets(target, ignore_index)
    if rows == 0 or classes == 0:
        zero = tangent.new_zeros(rows)
        return zero, zero, zero.double(), counted
    w = None if weight is None else weight.to(acc)
    d = (probabilities(logits, lse[:, None]) * tangent).sum(1)
    e = label_smoothing
    w_t = 1.0 if w is None else w.index_select(0, safe)
    ce = (1 - e) * w_t * (d - tangent.gather(1, safe[:, None])[:, 0])
    if e:
        total_w = float(classes) if w is None else w.sum()
        weighted = tangent.sum(1) if w is None else (tangent * w).sum(1)
        ce = ce + (e / classes) * (total_w * d - weighted)
    z = (2 * z_loss) * lse.to(acc) * d if z_loss else torch.zeros_like(d)
    finite = lse.isfinite()
    ce = torch.where(finite, ce, float("nan"))
    z = torch.where(finite, z, float("nan"))
    return torch.where(counted, ce, 0.0), torch.where(counted, z, 0.0), d.double(), counted


def _class_weights(weight, acc):
    """The class weights as every cross-entropy kernel takes them: in ``acc``, contiguous."""
    return None if weight is None else weight.to(acc).contiguous()


def _degenerate_cross_entropy(logits, target, ignore_index, label_smoothing, reduction):
    """(loss, lse, counts) of R = 0 rows or C = 0 classes, as torch: with no class a row
    could count for, every row must be ignored (a counted one is out of bounds); an ignored
    row's smoothing term is (e / 0) * 0 = NaN, the rest 0; "mean" divides by 0."""
    rows, classes = logits.shape
    acc = accumulation_dtype(logits.dtype)
    torch_ce.check_targets(target, ignore_index, classes)
    lse = logits.new_full((rows,), float("-inf"), dtype=torch.float64)
    per_row = torch.full(
        (rows,), float("nan") if label_smoothing else 0.0, dtype=acc, device=logits.device
    )
    counts = logits.new_zeros(3, dtype=torch.float64)
    if reduction == "none":
        return per_row, lse, counts
    total = per_row.sum()
    return (total / 0.0 if reduction == "mean" else total), lse, counts


def _cross_entropy_route(
    logits, target, weight, ignore_index, label_smoothing, z_loss, reduction, backend
):
    _check_cross_entropy("cross_entropy", logits, target, weight)
    check_reduction("cross_entropy", reduction)
    kernels = _kernels("cross_entropy", backend, logits)
    if logits.numel() == 0:
        return _degenerate_cross_entropy(logits, target, ignore_index, label_smoothing, reduction)
    w = _class_weights(weight, accumulation_dtype(logits.dtype))
    options = (ignore_index, label_smoothing, z_loss, reduction)
    if kernels.cross_entropy_loss is None:
        return torch_ce.loss_from_pieces(kernels.cross_entropy, logits, target, w, *options)
    return kernels.cross_entropy_loss(logits, target, w, *options)


def _cross_entropy_fake(
    logits, target, weight, ignore_index, label_smoothing, z_loss, reduction, backend
):
    _check_cross_entropy("cross_entropy", logits, target, weight)
    check_reduction("cross_entropy", reduction)
    return _cross_entropy_outputs(logits, reduction)


def _cross_entropy_outputs(logits, reduction):
    """(loss, lse, counts) as the kernels return them, empty: the fakes' answer."""
    rows = logits.shape[0]
    return (
        logits.new_empty(
            rows if reduction == "none" else (), dtype=accumulation_dtype(logits.dtype)
        ),
        logits.new_empty(rows, dtype=torch.float64),
        logits.new_empty(3, dtype=torch.float64),
    )


def _check_cross_entropy_gradients(grad_loss, grad_lse, lse, counts, rows, reduction):
    op = "cross_entropy_backward"
    want = (rows,) if reduction == "none" else ()
    if grad_loss.shape != want:
        raise RuntimeError(f"{op}(): grad_loss has shape {tuple(grad_loss.shape)}, expected {want}")
    for name, t, shape in (
        ("grad_lse", grad_lse, (rows,)),
        ("lse", lse, (rows,)),
        ("counts", counts, (3,)),
    ):
        if t is not None and t.shape != shape:
            raise RuntimeError(f"{op}(): {name} has shape {tuple(t.shape)}, expected {shape}")


def _cross_entropy_backward_route(
    grad_loss,
    grad_lse,
    logits,
    target,
    weight,
    lse,
    counts,
    ignore_index,
    label_smoothing,
    z_loss,
    reduction,
    backend,
):
    _check_cross_entropy("cross_entropy_backward", logits, target, weight)
    check_reduction("cross_entropy_backward", reduction)
    _check_cross_entropy_gradients(grad_loss, grad_lse, lse, counts, logits.shape[0], reduction)
    kernels = _kernels("cross_entropy_backward", backend, logits, grad_loss, lse, counts)
    if logits.numel() == 0:
        return torch.zeros_like(logits)
    acc = accumulation_dtype(logits.dtype)
    # The dtypes the kernels read (autograd hands over these; a direct call may not).
    if grad_loss.dtype != acc:
        grad_loss = grad_loss.to(acc)
    if grad_lse is not None and grad_lse.dtype != torch.float64:
        grad_lse = grad_lse.double()
    lse, counts = lse.double().contiguous(), counts.double().contiguous()
    w = _class_weights(weight, acc)
    args = (grad_loss, grad_lse, logits, target, w, lse, counts)
    options = (ignore_index, label_smoothing, z_loss, reduction)
    if kernels.cross_entropy_loss_backward is None:
        return torch_ce.gradient_from_terms(kernels.cross_entropy_backward, *args, *options)
    return kernels.cross_entropy_loss_backward(*args, *options)


def _cross_entropy_backward_fake(grad_loss, grad_lse, logits, target, weight, lse, counts, *rest):
    _check_cross_entropy("cross_entropy_backward", logits, target, weight)
    check_reduction("cross_entropy_backward", rest[3])
    _check_cross_entropy_gradients(grad_loss, grad_lse, lse, counts, logits.shape[0], rest[3])
    return torch.empty_like(logits)


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


def _cross_entropy_eager_vjp(ctx, kernels, grad_loss, grad_lse, _grad_counts):
    """The backward of a prepared eager forward (ops._library._function): the backend's fused
    kernel on the gradients as the backward op's router would hand them over (the loss's in
    the accumulation dtype, the lse's in float64), with the forward kernel's own lse and
    counts."""
    if kernels.cross_entropy_loss_backward is None or grad_loss is None or ctx.needs_input_grad[3]:
        return None
    # Unpacked only once the kernel will run (activation checkpointing unpacks once).
    logits, target, weight, lse, counts = ctx.saved_tensors
    acc = accumulation_dtype(logits.dtype)
    if grad_loss.dtype != acc:
        grad_loss = grad_loss.to(acc)
    if grad_lse is not None and grad_lse.dtype != torch.float64:
        grad_lse = grad_lse.double()
    options = ctx.options[:-1]  # without the backend
    dx = kernels.cross_entropy_loss_backward(
        grad_loss, grad_lse, logits, target, weight, lse, counts, *options
    )
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
# vmap: the vmapped dim and the rows flatten into one row dim. Per-sample class weights
# cannot share one call, so a vmapped ``weight`` runs one call per sample.


def _flat_rows(t: torch.Tensor | None, in_dim, size: int) -> torch.Tensor | None:
    """A per-row (R,) or (R, C) tensor of every sample as (size * R,) or (size * R, C)."""
    t = _front(t, in_dim, size)
    return None if t is None else t.flatten(0, 1)


def _cross_entropy_rule(info, in_dims, logits, target, weight, *options):
    reduction = options[3]
    if in_dims[2] is not None or reduction != "none":
        args = (logits, target, weight, *options)
        return _per_sample(ops.cross_entropy.default, info, in_dims, args)
    size = info.batch_size
    loss, lse, counts = ops.cross_entropy(
        _flat_rows(logits, in_dims[0], size), _flat_rows(target, in_dims[1], size), weight, *options
    )
    # counts is of the flattened call: it is not what one sample's forward gives, and only a
    # "mean" backward reads it (which runs per sample).
    counts = counts.expand(size, 3)
    return (loss.unflatten(0, (size, -1)), lse.unflatten(0, (size, -1)), counts), (0, 0, 0)


def _cross_entropy_backward_rule(info, in_dims, *args):
    grad_loss, grad_lse, logits, target, weight, lse, counts, *options = args
    if in_dims[4] is not None or options[3] != "none":
        return _per_sample(ops.cross_entropy_backward.default, info, in_dims, args)
    size = info.batch_size
    flat = [
        _flat_rows(t, d, size)
        for t, d in zip((grad_loss, grad_lse, logits, target), in_dims[:4], strict=True)
    ]
    lse = _flat_rows(lse, in_dims[5], size)
    counts = _front(counts, in_dims[6], size)[0] if in_dims[6] is not None else counts
    dx = ops.cross_entropy_backward(*flat, weight, lse, counts, *options)
    return dx.unflatten(0, (size, -1)), 0


# ----------------------------------------------------------------------------------------
# Autocast (CPU and CUDA): the op already returns float32 rows, so the rule is the dtype
# the public function rounds the loss to.


def loss_dtype(input: torch.Tensor) -> torch.dtype:
    """The dtype of cross_entropy's loss: float32 under autocast of the input's device for
    float16/bfloat16/float32 input, else the input's dtype."""
    device = input.device.type
    if device in _FLOAT32_LOSS_DEVICES and torch.is_autocast_enabled(device) and _eligible(input):
        return torch.float32
    return input.dtype


def _fused_rows(logits, target, weight, smoothing):
    rows = logits.shape[0]
    return tuple(logits.new_empty(rows, dtype=torch.float64) for _ in range(3))


# ----------------------------------------------------------------------------------------
# Registration.

register(
    "cross_entropy",
    "cross_entropy(Tensor logits, Tensor target, Tensor? weight, "
    "int ignore_index, float label_smoothing, float z_loss, str reduction, str backend) "
    "-> (Tensor loss, Tensor lse, Tensor counts)",
    _cross_entropy_route,
    _cross_entropy_fake,
    autograd=(
        _cross_entropy_setup,
        _cross_entropy_vjp,
        _cross_entropy_jvp,
        _cross_entropy_eager_vjp,
    ),
    vmap=_cross_entropy_rule,
)
register(
    "cross_entropy_backward",
    "cross_entropy_backward(Tensor grad_loss, Tensor? grad_lse, "
    "Tensor logits, Tensor target, Tensor? weight, Tensor lse, Tensor counts, "
    "int ignore_index, float label_smoothing, float z_loss, str reduction, str backend) "
    "-> Tensor",
    _cross_entropy_backward_route,
    _cross_entropy_backward_fake,
    autograd=(
        _cross_entropy_backward_setup,
        _cross_entropy_backward_vjp,
        _cross_entropy_backward_jvp,
    ),
    vmap=_cross_entropy_backward_rule,
)
register_fused_fake("_fused_cross_entropy", _fused_rows)
register_fused_fake(
    "_fused_cross_entropy_backward",
    lambda logits, target, weight, terms: logits.new_empty(logits.shape),
)
register_fused_fake(
    "_fused_cross_entropy_backward_inplace", lambda logits, target, weight, terms: None
)
register_fused_fake(
    "_fused_cross_entropy_loss",
    lambda logits, *options: _cross_entropy_outputs(logits, options[-1]),
)
register_fused_fake(
    "_fused_cross_entropy_loss_backward",
    lambda grad_loss, grad_lse, logits, *_: torch.empty_like(logits),
)
