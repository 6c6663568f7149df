"""softmax and log_softmax and their backward ops: the public functions, the ops' schemas,
routers, fake kernels, autograd rules, vmap rules and autocast rules::

    softmax(Tensor x, int dim, ScalarType? dtype, str backend) -> Tensor
    log_softmax(Tensor x, int dim, ScalarType? dtype, str backend) -> Tensor
    softmax_backward(Tensor grad, Tensor output, int dim, ScalarType input_dtype,
                     str backend) -> Tensor
    log_softmax_backward(...same...) -> Tensor

Autograd formulas (p = softmax, t a tangent, g a cotangent, all along ``dim``)::

    softmax      vjp  y * (g - sum(g * y))          jvp  y * (t - sum(t * y))  (the same map)
    log_softmax  vjp  g - p * sum(g)                jvp  t - sum(p * t)

With ``scale``, ``mask`` or ``causal`` the public functions call the masked op
(:mod:`stablekernels.ops.masked_softmax`).
"""

from __future__ import annotations

import torch

from .._api import (
    _check_dtype,
    _check_int,
    _check_tensor,
    _fast_rows,
    needs_grad,
    resolve_backend,
)
from ._checks import _check_same_shape, _kernels, check_floating, check_same_device, wrap_dim
from ._library import (
    _acc,
    _eligible,
    _front,
    _row_sum,
    apply_prepared,
    call_op,
    ops,
    register,
    register_fused_fake,
)
from .masked_softmax import _masked_options, _unmasked

# ----------------------------------------------------------------------------------------
# Public functions.


def _softmax_inputs(op: str, x, dim, dtype):
    x = _check_tensor(op, x)
    dim = _check_int(op, "dim", dim)
    dtype = _check_dtype(op, dtype)
    if not x.is_floating_point():
        if dtype is None:
            # torch raises NotImplementedError (a RuntimeError) here too.
            raise NotImplementedError(
                f"{op}(): input of dtype {x.dtype} needs dtype= set to a floating dtype"
            )
        # Integers become the requested dtype first, as torch's dtype= does.
        x, dtype = x.to(dtype), None
    return x, dim, dtype


def softmax(
    x: torch.Tensor,
    dim: int = -1,
    *,
    dtype: torch.dtype | None = None,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    causal_offset: int = 0,
    masked_rows: str = "zero",
    backend: str | None = None,
) -> torch.Tensor:
    """Softmax of ``x`` along ``dim``: ``exp(x_j - max) / (1 + s')`` with
    ``s' = sum_{i != argmax} exp(x_i - max)``.

    Shapes: any (0-dim included); the output has x's shape and is contiguous.
    Dtypes: float16/bfloat16/float32/float64 in; the output has ``dtype`` if given (the
    input is read in its own dtype and rounded once to ``dtype``), else x's dtype. Integer
    inputs need ``dtype=``. Halves are computed in fp32, fp64 in fp64.
    Guarantees: never overflows (softmax([1000, 1000]) is [0.5, 0.5]); special values as
    torch (a row with +inf or NaN is all NaN; all -inf is all NaN); each row independent.
    Differentiable twice.

    Attention (docs/masked_softmax.md): ``scale``, ``mask`` and ``causal`` give the softmax
    of ``t = scale * x + mask`` along the last dim, fused (x and the mask read once, the
    mask by its strides, never expanded). ``mask``: bool (True keeps, as
    ``F.scaled_dot_product_attention``'s ``attn_mask``) or floating (added), broadcastable
    to x. ``causal=True`` drops ``j > i + causal_offset`` (i, j: the indices along dims -2
    and -1) without a mask tensor. A row with nothing kept gives zeros (``masked_rows=
    "zero"``, as SDPA) or NaN (``"nan"``, as masked_fill then torch.softmax); its gradient
    is 0. Differentiable once (x and an additive mask); forward mode too.
    """
    if _unmasked(scale, mask, causal, causal_offset, masked_rows):
        fast = _fast_rows("softmax", x, dim, dtype, backend)
        if fast is not None and x.numel():
            if not needs_grad(x):
                return fast.kernel(x, fast.dim, fast.out, False)
            return apply_prepared("softmax", fast.autograd, x, fast.dim, dtype, fast.backend)
    x, dim, dtype = _softmax_inputs("softmax", x, dim, dtype)
    masked = _masked_options(
        "softmax", x, (wrap_dim("softmax", dim, x.dim()),), scale, mask, causal, causal_offset,
        masked_rows,
    )  # fmt: skip
    if masked is not None:
        mask, scale, offset, masked_rows = masked
        name = resolve_backend(backend, x.device)
        return call_op("masked_softmax", x, mask, scale, offset, dtype, False, masked_rows, name)[0]
    return call_op("softmax", x, dim, dtype, resolve_backend(backend, x.device))


def log_softmax(
    x: torch.Tensor,
    dim: int = -1,
    *,
    dtype: torch.dtype | None = None,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    causal_offset: int = 0,
    masked_rows: str = "zero",
    backend: str | None = None,
) -> torch.Tensor:
    """Log-softmax of ``x`` along ``dim``: ``(x_j - max) - log1p(s')``.

    Shapes, dtypes and special values as :func:`softmax`. The log1p form keeps entries
    near 0 accurate to relative precision: ``log_softmax([0., -20.])[0]`` is
    -2.0611536e-09, where ``log(sum(exp))`` gives 0. Differentiable twice.

    ``scale``, ``mask``, ``causal``, ``causal_offset`` and ``masked_rows`` as
    :func:`softmax`: dropped elements are -inf, a row with nothing kept -inf throughout
    ("zero": the log of zero probabilities) or NaN.
    """
    if _unmasked(scale, mask, causal, causal_offset, masked_rows):
        fast = _fast_rows("log_softmax", x, dim, dtype, backend)
        if fast is not None and x.numel():
            if not needs_grad(x):
                return fast.kernel(x, fast.dim, fast.out, True)
            return apply_prepared("log_softmax", fast.autograd, x, fast.dim, dtype, fast.backend)
    x, dim, dtype = _softmax_inputs("log_softmax", x, dim, dtype)
    masked = _masked_options(
        "log_softmax", x, (wrap_dim("log_softmax", dim, x.dim()),), scale, mask, causal,
        causal_offset, masked_rows,
    )  # fmt: skip
    if masked is not None:
        mask, scale, offset, masked_rows = masked
        name = resolve_backend(backend, x.device)
        return call_op("masked_softmax", x, mask, scale, offset, dtype, True, masked_rows, name)[0]
    return call_op("log_softmax", x, dim, dtype, resolve_backend(backend, x.device))


# ----------------------------------------------------------------------------------------
# Routers and fake kernels.


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


def _eager_vjp(log: bool):
    """The backward of a prepared eager forward (ops._library._function): the backend's
    kernel on the incoming gradient as the backward op's router would hand it over (one
    dtype with y, contiguous); y is the forward kernel's own output."""

    def vjp(ctx, kernels, g):
        if g is None:
            return None
        (y,) = ctx.saved_tensors  # unpacked only once the kernel will run (checkpointing)
        if g.dtype != y.dtype:
            g = g.to(y.dtype)
        dx = kernels.softmax_backward(g.contiguous(), y, ctx.dim, ctx.input_dtype, log)
        return dx, None, None, None

    return vjp


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
# vmap rules: the vmapped dim moves to the front and ``dim`` shifts by one (a logical 0-dim
# input becomes a row of one).


def _softmax_rule(name: str):
    def rule(info, in_dims, x, dim, dtype, backend):
        op = getattr(ops, name).default
        x = _front(x, in_dims[0], info.batch_size)
        if x.dim() == 1:  # a logical 0-dim input: a row of one
            return op(x.unsqueeze(1), 1, dtype, backend).squeeze(1), 0
        return op(x, wrap_dim(name, dim, x.dim() - 1) + 1, dtype, backend), 0

    return rule


def _softmax_backward_rule(name: str):
    def rule(info, in_dims, grad, output, dim, input_dtype, backend):
        op = getattr(ops, name).default
        grad = _front(grad, in_dims[0], info.batch_size)
        output = _front(output, in_dims[1], info.batch_size)
        if output.dim() == 1:
            dx = op(grad.unsqueeze(1), output.unsqueeze(1), 1, input_dtype, backend)
            return dx.squeeze(1), 0
        return op(grad, output, wrap_dim(name, dim, output.dim() - 1) + 1, input_dtype, backend), 0

    return rule


# ----------------------------------------------------------------------------------------
# Autocast (CUDA): a float32 result.


def _float32_result(x, dim, dtype, backend):
    if dtype is None and _eligible(x):
        dtype = torch.float32
    return x, dim, dtype, backend


# ----------------------------------------------------------------------------------------
# Registration.

register(
    "softmax",
    "softmax(Tensor x, int dim, ScalarType? dtype, str backend) -> Tensor",
    *_softmax_family("softmax", log=False),
    autograd=(_softmax_setup, _softmax_vjp, _softmax_jvp, _eager_vjp(log=False)),
    vmap=_softmax_rule("softmax"),
    autocast={"cuda": _float32_result},
)
register(
    "log_softmax",
    "log_softmax(Tensor x, int dim, ScalarType? dtype, str backend) -> Tensor",
    *_softmax_family("log_softmax", log=True),
    autograd=(_softmax_setup, _log_softmax_vjp, _log_softmax_jvp, _eager_vjp(log=True)),
    vmap=_softmax_rule("log_softmax"),
    autocast={"cuda": _float32_result},
)
register(
    "softmax_backward",
    "softmax_backward(Tensor grad, Tensor output, int dim, ScalarType input_dtype, "
    "str backend) -> Tensor",
    *_softmax_backward_family("softmax_backward", log=False),
    autograd=(_softmax_backward_setup, _softmax_backward_vjp, _softmax_backward_jvp),
    vmap=_softmax_backward_rule("softmax_backward"),
)
register(
    "log_softmax_backward",
    "log_softmax_backward(Tensor grad, Tensor output, int dim, ScalarType input_dtype, "
    "str backend) -> Tensor",
    *_softmax_backward_family("log_softmax_backward", log=True),
    autograd=(_softmax_backward_setup, _log_softmax_backward_vjp, _log_softmax_backward_jvp),
    vmap=_softmax_backward_rule("log_softmax_backward"),
)
register_fused_fake("_fused_softmax", lambda x, dim, dtype, log: x.new_empty(x.shape, dtype=dtype))
register_fused_fake(
    "_fused_softmax_backward",
    lambda grad, output, dim, input_dtype, log: output.new_empty(output.shape, dtype=input_dtype),
)
