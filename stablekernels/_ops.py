"""The custom ops of the ``stablekernels`` namespace: schemas, routers and fake kernels.

Every public function ends in one of these ops, each defined once and shared by all
backends; the backend is an argument, chosen by :mod:`stablekernels._api`::

    softmax(Tensor x, int dim, ScalarType? dtype, str backend) -> Tensor
    log_softmax(Tensor x, int dim, ScalarType? dtype, str backend) -> Tensor
    logsumexp(Tensor x, int dim, bool keepdim, str backend) -> (Tensor out, Tensor lse)
    softmax_backward(Tensor grad, Tensor output, int dim, ScalarType input_dtype,
                     str backend) -> Tensor
    log_softmax_backward(...same...) -> Tensor
    logsumexp_backward(Tensor grad, Tensor x, Tensor result, int dim, bool keepdim,
                       str backend) -> Tensor
    cross_entropy(Tensor logits, Tensor target, Tensor? weight, int ignore_index,
                  float label_smoothing, float z_loss, str reduction, str backend)
                  -> (Tensor loss, Tensor lse, Tensor counts)
    cross_entropy_backward(Tensor grad_loss, Tensor? grad_lse, Tensor logits, Tensor target,
                           Tensor? weight, Tensor lse, Tensor counts, int ignore_index,
                           float label_smoothing, float z_loss, str reduction,
                           str backend) -> Tensor

    masked_softmax(Tensor x, Tensor? mask, float scale, int? causal_offset,
                   ScalarType? dtype, bool log, bool nan_rows, str backend)
                   -> (Tensor y, Tensor lse)
    masked_softmax_backward(Tensor grad, Tensor output, Tensor lse, float scale, bool log,
                            ScalarType input_dtype, str backend) -> Tensor
    masked_logsumexp(Tensor x, Tensor? mask, float scale, int? causal_offset,
                     bool nan_rows, str backend) -> (Tensor out, Tensor lse)

``logsumexp`` returns the result in x's dtype and, beside it, the same log-sum-exp in
float64: the backward uses that one, since exp(x - lse) puts the rounding of the lse into
every gradient entry (ulp 0.5 at 100 in bf16: up to 28%; ulp 0.06 at 1e6 in fp32: up to
3%). The public function returns the first output only.

The router of each op (registered as CompositeExplicitAutograd, so it serves every device)
is the one place that checks the op's arguments. It handles 0-dim and empty inputs itself,
brings the rest to the preconditions of the backend kernels
(:mod:`stablekernels.backends`), and computes every per-row quantity on row-sized tensors,
so that the kernels are the same few passes over the data on every backend:

* the cross-entropy loss of each row from the kernel's pieces (nll, smooth, lse) and the
  options (ignore_index, class weights, label smoothing, z-loss);
* (nothing else: the cross-entropy's loss, reduction and backward coefficients and the
  logsumexp backward's hi/lo split of its lse are the kernels' own.)

A new per-row option of cross-entropy therefore changes this module and the public
function only (docs/design.md). Outputs are always new contiguous tensors, as
torch.softmax's are, which is what the fake kernels promise to ``torch.compile``. The
private kernel ops of the extension (``_fused_*``) get fake kernels here too, so that a
direct call of one under ``torch.compile`` traces.
"""

from __future__ import annotations

import torch

from . import _linear_tiles, backends
from ._numerics import accumulation_dtype, probabilities
from .backends import torch_ce

NAMESPACE = "stablekernels"
FLOATING_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

SCHEMAS = {
    "softmax": "softmax(Tensor x, int dim, ScalarType? dtype, str backend) -> Tensor",
    "log_softmax": "log_softmax(Tensor x, int dim, ScalarType? dtype, str backend) -> Tensor",
    "logsumexp": "logsumexp(Tensor x, int dim, bool keepdim, str backend) "
    "-> (Tensor out, Tensor lse)",
    "softmax_backward": "softmax_backward(Tensor grad, Tensor output, int dim, "
    "ScalarType input_dtype, str backend) -> Tensor",
    "log_softmax_backward": "log_softmax_backward(Tensor grad, Tensor output, int dim, "
    "ScalarType input_dtype, str backend) -> Tensor",
    "logsumexp_backward": "logsumexp_backward(Tensor grad, Tensor x, Tensor result, int dim, "
    "bool keepdim, str backend) -> Tensor",
    "cross_entropy": "cross_entropy(Tensor logits, Tensor target, Tensor? weight, "
    "int ignore_index, float label_smoothing, float z_loss, str reduction, str backend) "
    "-> (Tensor loss, Tensor lse, Tensor counts)",
    "cross_entropy_backward": "cross_entropy_backward(Tensor grad_loss, Tensor? grad_lse, "
    "Tensor logits, Tensor target, Tensor? weight, Tensor lse, Tensor counts, "
    "int ignore_index, float label_smoothing, float z_loss, str reduction, str backend) "
    "-> Tensor",
    "linear_cross_entropy": "linear_cross_entropy(Tensor input, Tensor linear_weight, "
    "Tensor? linear_bias, Tensor target, Tensor? weight, int ignore_index, "
    "float label_smoothing, float z_loss, float? softcap, float temperature, "
    "bool with_entropy, bool with_gradient, str backend) "
    "-> (Tensor loss, Tensor lse, Tensor entropy, Tensor logprob, Tensor unit_grad_input, "
    "Tensor unit_grad_linear_weight, Tensor unit_grad_linear_bias)",
    "linear_cross_entropy_backward": "linear_cross_entropy_backward(Tensor grad_loss, "
    "Tensor grad_lse, Tensor grad_entropy, Tensor grad_logprob, Tensor input, "
    "Tensor linear_weight, Tensor? linear_bias, Tensor target, Tensor? weight, Tensor lse, "
    "Tensor row_entropy, int ignore_index, float label_smoothing, float z_loss, "
    "float? softcap, float temperature, bool with_entropy, str backend) "
    "-> (Tensor grad_input, Tensor grad_linear_weight, Tensor grad_linear_bias)",
    "masked_softmax": "masked_softmax(Tensor x, Tensor? mask, float scale, int? causal_offset, "
    "ScalarType? dtype, bool log, bool nan_rows, str backend) -> (Tensor y, Tensor lse)",
    "masked_softmax_backward": "masked_softmax_backward(Tensor grad, Tensor output, "
    "Tensor lse, float scale, bool log, ScalarType input_dtype, str backend) -> Tensor",
    "masked_logsumexp": "masked_logsumexp(Tensor x, Tensor? mask, float scale, "
    "int? causal_offset, bool nan_rows, str backend) -> (Tensor out, Tensor lse)",
}

_lib = torch.library.Library(NAMESPACE, "DEF")
for _schema in SCHEMAS.values():
    _lib.define(_schema)


# ----------------------------------------------------------------------------------------
# Argument checks, shared by the routers, the fake kernels and the public functions.


def wrap_dim(op: str, dim: int, ndim: int) -> int:
    """``dim`` as a non-negative index into a tensor of ``ndim`` dims (0-dim counts as 1-dim,
    as in torch); IndexError in torch's words when out of range."""
    rank = max(ndim, 1)
    if not -rank <= dim < rank:
        raise IndexError(
            f"{op}(): Dimension out of range (expected to be in range of "
            f"[{-rank}, {rank - 1}], but got {dim})"
        )
    return dim % rank


def check_floating(op: str, what: str, dtype: torch.dtype) -> None:
    if dtype not in FLOATING_DTYPES:
        raise NotImplementedError(
            f"{op}(): {what} has dtype {dtype}; stablekernels computes in "
            "float16, bfloat16, float32 and float64"
        )


def check_same_device(op: str, *tensors: torch.Tensor) -> None:
    device = tensors[0].device
    for t in tensors[1:]:
        if t.device != device:
            raise RuntimeError(
                f"{op}(): expected all tensors on one device, got {device} and {t.device}"
            )


# (backend, device type) -> Kernels, for the pairs that were served once: what a backend
# can serve is fixed at import (stablekernels.backends), so the check is made once per pair.
_SERVED: dict[tuple[str, str], backends.Kernels] = {}


def _kernels(op: str, backend: str, *tensors: torch.Tensor) -> backends.Kernels:
    if len(tensors) > 1:
        check_same_device(op, *tensors)
    key = (backend, tensors[0].device.type)
    kernels = _SERVED.get(key)
    if kernels is None:
        kernels = _SERVED[key] = backends.check_serves(backend, tensors[0].device).kernels()
    return kernels


def _check_same_shape(op: str, grad: torch.Tensor, output: torch.Tensor) -> None:
    if grad.shape != output.shape:
        raise RuntimeError(
            f"{op}(): grad has shape {tuple(grad.shape)}, expected {tuple(output.shape)}"
        )


def _reduced_shape(shape: torch.Size, dim: int, keepdim: bool) -> list[int]:
    out = list(shape)
    if not out:
        return []
    if keepdim:
        out[dim] = 1
    else:
        del out[dim]
    return out


def _per_row(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A per-row tensor (a reduced shape, with or without keepdim) as a flat contiguous
    vector of ``dtype`` in row order (o * inner + i): the order of a reduced shape's
    elements."""
    return t.to(dtype).contiguous().reshape(-1)


# ----------------------------------------------------------------------------------------
# Softmax and log_softmax.


def _softmax_family(op: str, log: bool):
    def check(x, dim, dtype):
        dim = wrap_dim(op, dim, x.dim())
        out_dtype = x.dtype if dtype is None else dtype
        check_floating(op, "the input", x.dtype)
        check_floating(op, "the requested dtype", out_dtype)
        return dim, out_dtype

    def route(x: torch.Tensor, dim: int, dtype: torch.dtype | None, backend: str):
        dim, out_dtype = check(x, dim, dtype)
        kernels = _kernels(op, backend, x)
        if x.numel() == 0:
            return torch.empty(x.shape, dtype=out_dtype, device=x.device)
        if x.dim() == 0:
            return kernels.softmax(x.reshape(1), 0, out_dtype, log).reshape(())
        return kernels.softmax(x, dim, out_dtype, log)

    def fake(x, dim, dtype, backend):
        _, out_dtype = check(x, dim, dtype)
        return x.new_empty(x.shape, dtype=out_dtype)

    return route, fake


def _softmax_backward_family(op: str, log: bool):
    def check(grad, output, dim, input_dtype):
        dim = wrap_dim(op, dim, output.dim())
        check_floating(op, "the output", output.dtype)
        check_floating(op, "the input dtype", input_dtype)
        check_same_device(op, output, grad)
        _check_same_shape(op, grad, output)
        return dim

    def route(grad, output, dim, input_dtype, backend):
        dim = check(grad, output, dim, input_dtype)
        kernels = _kernels(op, backend, output, grad)
        if output.numel() == 0:
            return output.new_empty(output.shape, dtype=input_dtype)
        # One dtype, contiguous (autograd hands over expanded grads, e.g. of sum()).
        if grad.dtype != output.dtype:
            grad = grad.to(output.dtype)
        grad = grad.contiguous()
        output = output.contiguous()
        if output.dim() == 0:
            dx = kernels.softmax_backward(grad.reshape(1), output.reshape(1), 0, input_dtype, log)
            return dx.reshape(())
        return kernels.softmax_backward(grad, output, dim, input_dtype, log)

    def fake(grad, output, dim, input_dtype, backend):
        check(grad, output, dim, input_dtype)
        return output.new_empty(output.shape, dtype=input_dtype)

    return route, fake


# ----------------------------------------------------------------------------------------
# logsumexp.


def _logsumexp_check(x, dim):
    dim = wrap_dim("logsumexp", dim, x.dim())
    check_floating("logsumexp", "the input", x.dtype)
    return dim


def _logsumexp_route(x: torch.Tensor, dim: int, keepdim: bool, backend: str):
    dim = _logsumexp_check(x, dim)
    kernels = _kernels("logsumexp", backend, x)
    if x.dim() == 0:
        out, lse = kernels.logsumexp(x.reshape(1), 0, False)
        return out.reshape(()), lse.reshape(())
    if x.numel() == 0:
        # An empty sum is 0, so an empty row's logsumexp is -inf; empty batches stay empty.
        shape = _reduced_shape(x.shape, dim, keepdim)
        return (
            torch.full(shape, float("-inf"), dtype=x.dtype, device=x.device),
            torch.full(shape, float("-inf"), dtype=torch.float64, device=x.device),
        )
    return kernels.logsumexp(x, dim, keepdim)


def _logsumexp_fake(x, dim, keepdim, backend):
    dim = _logsumexp_check(x, dim)
    shape = _reduced_shape(x.shape, dim, keepdim)
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.float64)


def _logsumexp_backward_check(grad, x, result, dim):
    dim = wrap_dim("logsumexp_backward", dim, x.dim())
    check_floating("logsumexp_backward", "the input", x.dtype)
    check_same_device("logsumexp_backward", x, grad, result)
    return dim


def _logsumexp_backward_route(grad, x, result, dim, keepdim, backend):
    dim = _logsumexp_backward_check(grad, x, result, dim)
    kernels = _kernels("logsumexp_backward", backend, x, grad, result)
    if x.numel() == 0:
        return x.new_empty(x.shape)
    # One value per row, in row order: views (an expanded gradient, of sum(), keeps stride
    # 0), converted only when a caller hands over another dtype.
    g = grad.reshape(-1)
    if g.dtype != x.dtype:
        g = g.to(x.dtype)
    lse = result.reshape(-1)
    if lse.dtype != torch.float64:
        lse = lse.double()
    lse = lse.contiguous()
    if x.dim() == 0:
        return kernels.logsumexp_backward(g, x.reshape(1), lse, 0).reshape(())
    return kernels.logsumexp_backward(g, x, lse, dim)


def _logsumexp_backward_fake(grad, x, result, dim, keepdim, backend):
    _logsumexp_backward_check(grad, x, result, dim)
    return x.new_empty(x.shape)


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


REDUCTIONS = ("mean", "sum", "none")


def check_reduction(op: str, reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}(): {reduction} is not a valid value for reduction")


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
        ones, zeros = input.new_ones(rows, dtype=acc), input.new_zeros(rows, dtype=acc)

        def unit_terms(lse_rows, r):
            return torch_ce.per_row_backward_terms(
                ones[r], zeros[r], lse_rows, safe[r], counted[r], w, vocab,
                label_smoothing, z_loss, acc,
            )  # fmt: skip

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
# Masked softmax, log_softmax and logsumexp along the last dim (docs/masked_softmax.md):
# t = scale * x + mask (additive) or -inf where a bool mask is False or, causally, where
# j > i + causal_offset (i the row's index along x's dim -2). A row with nothing kept is 0
# (softmax), -inf (log_softmax, logsumexp) or, with nan_rows, NaN; its gradient is 0. The
# ops' lse output (float64, x's shape without its last dim) is -inf on such rows whatever
# nan_rows says: the backward finds them there.


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


def _masked_kernel(op, backend, x, mask):
    kernels = _kernels(op, backend, x, *(() if mask is None else (mask,)))
    if kernels.masked_softmax is None:
        raise backends.BackendUnavailableError(
            f"{op}(): the {backend} backend has no masked softmax kernel"
        )
    return kernels.masked_softmax


def _masked_rows(op, backend, x, mask, scale, causal_offset, dtype, mode):
    """The kernel's (y, lse) on x as rows along its last dim (0-dim as one row of one); lse
    shaped as x without its last dim. An additive mask is converted to the accumulation
    dtype before it is expanded (a view), so no mask-sized copy is made."""
    kernel = _masked_kernel(op, backend, x, mask)
    rows_shape = x.shape[:-1]
    if x.dim() == 0:
        x = x.reshape(1)
        mask = None if mask is None else mask.reshape(1)
    if mask is not None:
        if mask.dtype != torch.bool:
            mask = mask.to(accumulation_dtype(x.dtype, dtype))
        mask = mask.expand(x.shape)
    y, lse = kernel(x.contiguous(), mask, float(scale), causal_offset, dtype, mode)
    return y, lse.view(rows_shape)


def _masked_softmax_family():
    op = "masked_softmax"

    def route(x, mask, scale, causal_offset, dtype, log, nan_rows, backend):
        _check_masked(op, x, mask)
        out_dtype = x.dtype if dtype is None else dtype
        check_floating(op, "the requested dtype", out_dtype)
        if x.numel() == 0:
            _masked_kernel(op, backend, x, mask)
            return (
                torch.empty(x.shape, dtype=out_dtype, device=x.device),
                torch.empty(x.shape[:-1], dtype=torch.float64, device=x.device),
            )
        y, lse = _masked_rows(op, backend, x, mask, scale, causal_offset, out_dtype, int(log))
        y = y.view(x.shape)
        if nan_rows:
            dead = lse == float("-inf")
            if dead.any():
                y = y.masked_fill(dead.unsqueeze(-1) if x.dim() else dead, float("nan"))
        return y, lse

    def fake(x, mask, scale, causal_offset, dtype, log, nan_rows, backend):
        _check_masked(op, x, mask)
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


def _masked_softmax_backward_route(grad, output, lse, scale, log, input_dtype, backend):
    """scale * (softmax or log_softmax backward of y), 0 on dropped elements (log_softmax:
    where y is -inf) and on rows with nothing kept (lse -inf): the plain backward op's router
    (the backend's fused kernel; no mask read), then those fixes in place on its new
    output."""
    _masked_softmax_backward_check(grad, output, lse, input_dtype)
    plain = ROUTERS["log_softmax_backward" if log else "softmax_backward"]
    dx = plain(grad, output, -1, input_dtype, backend)
    if output.numel() == 0:
        return dx
    if scale != 1.0:
        dx.mul_(scale)  # one pass over the kernel's own output
    if log:  # log_softmax's backward gives dx = g where y = -inf (exp(y) = 0): dropped
        dx.masked_fill_(output == float("-inf"), 0.0)
    # Rows with nothing kept (NaN under masked_rows="nan"): always filled, since asking
    # whether there are any would be a host synchronisation on a GPU.
    dead = lse == float("-inf")
    dx.masked_fill_(dead.unsqueeze(-1) if output.dim() else dead, 0.0)
    return dx


def _masked_softmax_backward_fake(grad, output, lse, scale, log, input_dtype, backend):
    _masked_softmax_backward_check(grad, output, lse, input_dtype)
    return output.new_empty(output.shape, dtype=input_dtype)


def _masked_logsumexp_route(x, mask, scale, causal_offset, nan_rows, backend):
    op = "masked_logsumexp"
    _check_masked(op, x, mask)
    if x.numel() == 0:
        _masked_kernel(op, backend, x, mask)
        shape = x.shape[:-1]
        return (
            torch.full(shape, float("-inf"), dtype=x.dtype, device=x.device),
            torch.full(shape, float("-inf"), dtype=torch.float64, device=x.device),
        )
    _, lse = _masked_rows(op, backend, x, mask, scale, causal_offset, x.dtype, 2)
    out = lse
    if nan_rows:
        out = torch.where(lse == float("-inf"), float("nan"), lse)
    return out.to(x.dtype), lse


def _masked_logsumexp_fake(x, mask, scale, causal_offset, nan_rows, backend):
    _check_masked("masked_logsumexp", x, mask)
    return x.new_empty(x.shape[:-1]), x.new_empty(x.shape[:-1], dtype=torch.float64)


_ROUTES = {
    "softmax": _softmax_family("softmax", log=False),
    "log_softmax": _softmax_family("log_softmax", log=True),
    "logsumexp": (_logsumexp_route, _logsumexp_fake),
    "softmax_backward": _softmax_backward_family("softmax_backward", log=False),
    "log_softmax_backward": _softmax_backward_family("log_softmax_backward", log=True),
    "logsumexp_backward": (_logsumexp_backward_route, _logsumexp_backward_fake),
    "cross_entropy": (_cross_entropy_route, _cross_entropy_fake),
    "cross_entropy_backward": (_cross_entropy_backward_route, _cross_entropy_backward_fake),
    "linear_cross_entropy": (_linear_cross_entropy_route, _linear_cross_entropy_fake),
    "linear_cross_entropy_backward": (
        _linear_cross_entropy_backward_route,
        _linear_cross_entropy_backward_fake,
    ),
    "masked_softmax": _masked_softmax_family(),
    "masked_softmax_backward": (_masked_softmax_backward_route, _masked_softmax_backward_fake),
    "masked_logsumexp": (_masked_logsumexp_route, _masked_logsumexp_fake),
}
ROUTERS = {name: route for name, (route, _) in _ROUTES.items()}
for _name, (_route, _fake) in _ROUTES.items():
    _lib.impl(_name, _route, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{_name}", _fake, lib=_lib)


# ----------------------------------------------------------------------------------------
# Fake kernels of the extension's private kernel ops (their preconditions are the routers').


def _fused_reduced(x, dim, keepdim):
    shape = _reduced_shape(x.shape, dim, keepdim)
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.float64)


def _fused_rows(logits, target, weight, smoothing):
    rows = logits.shape[0]
    return tuple(logits.new_empty(rows, dtype=torch.float64) for _ in range(3))


_FUSED_FAKES = {
    "_fused_softmax": lambda x, dim, dtype, log: x.new_empty(x.shape, dtype=dtype),
    "_fused_softmax_backward": lambda grad, output, dim, input_dtype, log: output.new_empty(
        output.shape, dtype=input_dtype
    ),
    "_fused_logsumexp": _fused_reduced,
    "_fused_logsumexp_backward": lambda grad, x, lse, dim: x.new_empty(x.shape),
    "_fused_cross_entropy": _fused_rows,
    "_fused_cross_entropy_backward": lambda logits, target, weight, terms: logits.new_empty(
        logits.shape
    ),
    "_fused_cross_entropy_backward_inplace": lambda logits, target, weight, terms: None,
    "_fused_cross_entropy_loss": lambda logits, *options: _cross_entropy_outputs(
        logits, options[-1]
    ),
    "_fused_cross_entropy_loss_backward": lambda grad_loss, grad_lse, logits, *_: torch.empty_like(
        logits
    ),
    "_fused_masked_softmax": lambda x, mask, scale, causal_offset, dtype, mode: (
        x.new_empty((0,) if mode == 2 else x.shape, dtype=dtype),
        x.new_empty(x.numel() // x.shape[-1], dtype=torch.float64),
    ),
}
if backends.EXTENSION:  # the ops exist only where stablekernels._C loaded
    for _name, _fake in _FUSED_FAKES.items():
        torch.library.register_fake(f"{NAMESPACE}::{_name}", _fake, lib=_lib)

ops = torch.ops.stablekernels
