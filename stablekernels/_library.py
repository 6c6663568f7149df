"""The custom ops of the ``stablekernels`` namespace: schemas, the backend router, fake
kernels and autograd.

Every public function ends in one of these ops, each defined once and shared by all
backends; the backend is an argument, chosen by :mod:`stablekernels._api`::

    stablekernels::softmax(Tensor x, int dim, ScalarType? dtype, str backend) -> Tensor
    stablekernels::log_softmax(Tensor x, int dim, ScalarType? dtype, str backend) -> Tensor
    stablekernels::logsumexp(Tensor x, int dim, bool keepdim, str backend)
                             -> (Tensor out, Tensor lse)
    stablekernels::softmax_backward(Tensor grad, Tensor output, int dim,
                                    ScalarType input_dtype, str backend) -> Tensor
    stablekernels::log_softmax_backward(...same...) -> Tensor
    stablekernels::logsumexp_backward(Tensor grad, Tensor x, Tensor result, int dim,
                                      bool keepdim, str backend) -> Tensor
    stablekernels::cross_entropy(Tensor logits, Tensor target, Tensor? weight,
                                 int ignore_index, float label_smoothing, float z_loss,
                                 str backend) -> (Tensor loss, Tensor lse)
    stablekernels::cross_entropy_backward(Tensor grad_loss, Tensor grad_lse, Tensor logits,
                                          Tensor target, Tensor? weight, Tensor lse, ...)

``logsumexp`` returns the result in x's dtype and, beside it, the same log-sum-exp in
float64: the backward uses that one, since exp(x - lse) puts the rounding of the lse into
every gradient entry (ulp 0.5 at 100 in bf16: up to 28%; ulp 0.06 at 1e6 in fp32: up to
3%). The public function returns the first output only.

One router per op (registered as CompositeExplicitAutograd, so it serves every device)
checks the arguments, handles 0-dim and empty inputs itself, and hands everything else to
the named backend's kernel (see :mod:`stablekernels.backends`). Outputs are always new
contiguous tensors, as torch.softmax's are (even for a transposed input), which is what the
fake kernels promise to ``torch.compile``.

Autograd is registered for the forward ops and for the backward ops, so the backward is
itself differentiable (gradgradcheck holds). The formulas::

    softmax      dx = y * (dy - sum(dy * y))
    log_softmax  dx = dy - exp(y) * sum(dy)
    logsumexp    dx = dy * exp(x - lse)
"""

from __future__ import annotations

import torch

from . import backends

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
    "int ignore_index, float label_smoothing, float z_loss, str backend) "
    "-> (Tensor loss, Tensor lse)",
    "cross_entropy_backward": "cross_entropy_backward(Tensor grad_loss, Tensor grad_lse, "
    "Tensor logits, Tensor target, Tensor? weight, Tensor lse, int ignore_index, "
    "float label_smoothing, float z_loss, str backend) -> Tensor",
}

_lib = torch.library.Library(NAMESPACE, "DEF")
for _schema in SCHEMAS.values():
    _lib.define(_schema)


# ----------------------------------------------------------------------------------------
# Argument checks shared by the routers and the fake kernels.


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


def _kernels(op: str, backend: str, *tensors: torch.Tensor):
    check_same_device(op, *tensors)
    backends.check_serves(backend, tensors[0].device)
    return backends.get_backend(backend).kernels()


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


# ----------------------------------------------------------------------------------------
# Forward routers.


def _softmax_family(kernel_name: str):
    op_name = kernel_name

    def route(x: torch.Tensor, dim: int, dtype: torch.dtype | None, backend: str):
        dim = wrap_dim(op_name, dim, x.dim())
        out_dtype = x.dtype if dtype is None else dtype
        check_floating(op_name, "the input", x.dtype)
        check_floating(op_name, "the requested dtype", out_dtype)
        kernels = _kernels(op_name, backend, x)
        if x.numel() == 0:
            return torch.empty(x.shape, dtype=out_dtype, device=x.device)
        if x.dim() == 0:
            return getattr(kernels, kernel_name)(x.reshape(1), 0, out_dtype).reshape(())
        return getattr(kernels, kernel_name)(x, dim, out_dtype)

    def fake(x, dim, dtype, backend):
        wrap_dim(op_name, dim, x.dim())
        check_floating(op_name, "the input", x.dtype)
        return x.new_empty(x.shape, dtype=x.dtype if dtype is None else dtype)

    return route, fake


def _logsumexp_route(x: torch.Tensor, dim: int, keepdim: bool, backend: str):
    dim = wrap_dim("logsumexp", dim, x.dim())
    check_floating("logsumexp", "the input", x.dtype)
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
    dim = wrap_dim("logsumexp", dim, x.dim())
    check_floating("logsumexp", "the input", x.dtype)
    shape = _reduced_shape(x.shape, dim, keepdim)
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.float64)


# ----------------------------------------------------------------------------------------
# Backward routers.


def _softmax_backward_family(kernel_name: str):
    op_name = kernel_name

    def route(grad, output, dim, input_dtype, backend):
        dim = wrap_dim(op_name, dim, output.dim())
        check_floating(op_name, "the input dtype", input_dtype)
        _check_same_shape(op_name, grad, output)
        kernels = _kernels(op_name, backend, output, grad)
        if output.numel() == 0:
            return output.new_empty(output.shape, dtype=input_dtype)
        if output.dim() == 0:
            result = getattr(kernels, kernel_name)(
                grad.reshape(1), output.reshape(1), 0, input_dtype
            )
            return result.reshape(())
        return getattr(kernels, kernel_name)(grad, output, dim, input_dtype)

    def fake(grad, output, dim, input_dtype, backend):
        wrap_dim(op_name, dim, output.dim())
        check_same_device(op_name, output, grad)
        _check_same_shape(op_name, grad, output)
        return output.new_empty(output.shape, dtype=input_dtype)

    return route, fake


def _logsumexp_backward_route(grad, x, result, dim, keepdim, backend):
    dim = wrap_dim("logsumexp_backward", dim, x.dim())
    kernels = _kernels("logsumexp_backward", backend, x, grad, result)
    if x.numel() == 0:
        return x.new_empty(x.shape)
    if x.dim() == 0:
        dx = kernels.logsumexp_backward(grad.reshape(1), x.reshape(1), result.reshape(1), 0, True)
        return dx.reshape(())
    return kernels.logsumexp_backward(grad, x, result, dim, keepdim)


def _logsumexp_backward_fake(grad, x, result, dim, keepdim, backend):
    wrap_dim("logsumexp_backward", dim, x.dim())
    check_same_device("logsumexp_backward", x, grad, result)
    return x.new_empty(x.shape)


# ----------------------------------------------------------------------------------------
# Cross-entropy of (R, C) logits and (R,) class targets: per-row losses (fp32, fp64 for fp64
# logits; weighted and smoothed, 0 on ignored rows) and per-row lse (fp64). Reduction and
# shapes: stablekernels._cross_entropy.


def _loss_dtype(logits: torch.Tensor) -> torch.dtype:
    """Per-row losses are in the accumulation dtype: fp32, or fp64 for fp64 logits."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _check_cross_entropy(op, logits, target, weight):
    if logits.dim() != 2:
        raise RuntimeError(f"{op}(): logits must be 2-D (rows, classes), got {tuple(logits.shape)}")
    check_floating(op, "the logits", logits.dtype)
    if target.dtype != torch.int64 or target.shape != logits.shape[:1]:
        raise RuntimeError(
            f"{op}(): target must be int64 of shape ({logits.shape[0]},), got {target.dtype} "
            f"{tuple(target.shape)}"
        )
    if weight is not None:
        check_floating(op, "the weight", weight.dtype)
        if weight.shape != logits.shape[1:]:
            raise RuntimeError(f"{op}(): weight must have shape ({logits.shape[1]},)")
        check_same_device(op, logits, target, weight)
    else:
        check_same_device(op, logits, target)


def _cross_entropy_route(logits, target, weight, ignore_index, label_smoothing, z_loss, backend):
    _check_cross_entropy("cross_entropy", logits, target, weight)
    kernels = _kernels("cross_entropy", backend, logits)
    if logits.shape[0] == 0:
        return (
            logits.new_empty(0, dtype=_loss_dtype(logits)),
            logits.new_empty(0, dtype=torch.float64),
        )
    return kernels.cross_entropy(logits, target, weight, ignore_index, label_smoothing, z_loss)


def _cross_entropy_fake(logits, target, weight, ignore_index, label_smoothing, z_loss, backend):
    _check_cross_entropy("cross_entropy", logits, target, weight)
    rows = logits.shape[0]
    return (
        logits.new_empty(rows, dtype=_loss_dtype(logits)),
        logits.new_empty(rows, dtype=torch.float64),
    )


def _cross_entropy_backward_route(
    grad_loss, grad_lse, logits, target, weight, lse, ignore_index, label_smoothing, z_loss, backend
):
    _check_cross_entropy("cross_entropy_backward", logits, target, weight)
    kernels = _kernels("cross_entropy_backward", backend, logits, grad_loss, grad_lse, lse)
    if logits.numel() == 0:
        return torch.zeros_like(logits)
    return kernels.cross_entropy_backward(
        grad_loss, grad_lse, logits, target, weight, lse, ignore_index, label_smoothing, z_loss
    )


def _cross_entropy_backward_fake(
    grad_loss, grad_lse, logits, target, weight, lse, ignore_index, label_smoothing, z_loss, backend
):
    _check_cross_entropy("cross_entropy_backward", logits, target, weight)
    return torch.empty_like(logits)


_ROUTES = {
    "softmax": _softmax_family("softmax"),
    "log_softmax": _softmax_family("log_softmax"),
    "logsumexp": (_logsumexp_route, _logsumexp_fake),
    "softmax_backward": _softmax_backward_family("softmax_backward"),
    "log_softmax_backward": _softmax_backward_family("log_softmax_backward"),
    "logsumexp_backward": (_logsumexp_backward_route, _logsumexp_backward_fake),
    "cross_entropy": (_cross_entropy_route, _cross_entropy_fake),
    "cross_entropy_backward": (_cross_entropy_backward_route, _cross_entropy_backward_fake),
}
for _name, (_route, _fake) in _ROUTES.items():
    _lib.impl(_name, _route, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{_name}", _fake, lib=_lib)

ops = torch.ops.stablekernels


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
    return t if t.dtype == torch.float64 else t.float()


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
    logits, target, weight, ignore_index, label_smoothing, z_loss, backend = inputs
    ctx.save_for_backward(logits, target, weight, output[1])
    ctx.options = (ignore_index, label_smoothing, z_loss, backend)


def _cross_entropy_grad(ctx, grad_loss, grad_lse):
    # No gradient for the targets or the class weights (torch has none for weight either).
    logits, target, weight, lse = ctx.saved_tensors
    if grad_loss is None:
        grad_loss = lse.new_zeros(lse.shape, dtype=_loss_dtype(logits))
    if grad_lse is None:
        grad_lse = torch.zeros_like(lse)
    dx = ops.cross_entropy_backward(grad_loss, grad_lse, logits, target, weight, lse, *ctx.options)
    return dx, None, None, None, None, None, None


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
