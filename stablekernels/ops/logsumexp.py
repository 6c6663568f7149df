"""logsumexp and its backward op: the public function, the ops' schemas, routers, fake
kernels, autograd rules, vmap rules and autocast rule::

    logsumexp(Tensor x, int dim, bool keepdim, str backend) -> (Tensor out, Tensor lse)
    logsumexp_backward(Tensor grad, Tensor x, Tensor result, int dim, bool keepdim,
                       str backend) -> Tensor

``logsumexp`` returns the result in x's dtype and, beside it, the same log-sum-exp in
float64: the backward uses that one, since exp(x - lse) puts the rounding of the lse into
every gradient entry (ulp 0.5 at 100 in bf16: up to 28%; ulp 0.06 at 1e6 in fp32: up to
3%). The public function returns the first output only. Autograd (p = softmax, t a tangent,
g a cotangent, along ``dim``): vjp ``g * p``, jvp ``sum(p * t)``.

With ``scale``, ``mask`` or ``causal`` the public function calls the masked op
(:mod:`stablekernels.ops.masked_softmax`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._api import _check_int, _check_tensor, _fast_rows, needs_grad, resolve_backend
from .._numerics import probabilities
from ._checks import _kernels, _reduced_shape, check_floating, check_same_device, wrap_dim
from ._library import (
    _acc,
    _eligible,
    _front,
    apply_prepared,
    call_op,
    ops,
    register,
    register_fused_fake,
)
from .masked_softmax import _masked_options, _unmasked

# ----------------------------------------------------------------------------------------
# The public function.


def _reduce_dims(x: torch.Tensor, dim) -> tuple[int, ...]:
    """``dim`` (int or sequence of ints) as sorted, wrapped, distinct dims of ``x``."""
    if isinstance(dim, Sequence) and not isinstance(dim, str):
        raw = [_check_int("logsumexp", "dim", d) for d in dim]
    else:
        raw = [_check_int("logsumexp", "dim", dim)]
    wrapped = [wrap_dim("logsumexp", d, x.dim()) for d in raw]
    for i, d in enumerate(wrapped):
        if d in wrapped[:i]:
            raise RuntimeError(f"logsumexp(): dim {d} appears multiple times in the list of dims")
    return tuple(sorted(wrapped))


def logsumexp(
    x: torch.Tensor,
    dim: int | Sequence[int] = -1,
    keepdim: bool = False,
    *,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    causal_offset: int = 0,
    masked_rows: str = "zero",
    backend: str | None = None,
) -> torch.Tensor:
    """``log(sum(exp(x)))`` over ``dim`` (an int or a tuple of ints), as ``max + log1p(s')``.

    Shapes: reduced dims removed, or kept as size 1 with ``keepdim=True``; an empty reduced
    dim gives -inf. Dtypes: the output has x's dtype (integer and bool inputs give the
    default float dtype, as torch); halves are accumulated in fp32 and rounded once, so a
    float16 row of 70000 zeros gives log(70000) = 11.16, not inf. Special values as torch:
    all -inf -> -inf, any +inf -> +inf, any NaN -> NaN. Differentiable twice.

    ``scale``, ``mask``, ``causal``, ``causal_offset`` and ``masked_rows`` as
    :func:`softmax` (along the last dim): the log-sum-exp of the kept ``scale * x + mask``;
    a row with nothing kept is -inf ("zero") or NaN.
    """
    if _unmasked(scale, mask, causal, causal_offset, masked_rows) and type(keepdim) is bool:
        fast = _fast_rows("logsumexp", x, dim, None, backend, keepdim)
        if fast is not None and x.numel():
            if not needs_grad(x):
                return fast.kernel(x, fast.dim, fast.out)[0]
            return apply_prepared("logsumexp", fast.autograd, x, fast.dim, fast.out, fast.backend)[
                0
            ]
    x = _check_tensor("logsumexp", x)
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    keepdim = bool(keepdim)
    dims = _reduce_dims(x, dim)
    name = resolve_backend(backend, x.device)
    masked = _masked_options("logsumexp", x, dims, scale, mask, causal, causal_offset, masked_rows)
    if masked is not None:
        mask, scale, offset, masked_rows = masked
        out = call_op("masked_logsumexp", x, mask, scale, offset, masked_rows, name)[0]
        return out.unsqueeze(-1) if keepdim and x.dim() else out
    if len(dims) == 1 or x.dim() == 0:
        return call_op("logsumexp", x, dims[0] if dims else 0, keepdim, name)[0]
    if not dims:
        # torch.logsumexp rejects an empty dim list on a tensor with dims, as do we.
        raise RuntimeError(
            f"logsumexp(): dim=() reduces nothing on a {x.dim()}-dim tensor; name the dims"
        )
    # Several dims: move them last and flatten them into one row (a view when x allows).
    kept = [d for d in range(x.dim()) if d not in dims]
    rows = x.permute(*kept, *dims).flatten(start_dim=len(kept))
    result = call_op("logsumexp", rows, -1, False, name)[0]
    if keepdim:
        result = result.reshape([1 if d in dims else n for d, n in enumerate(x.shape)])
    return result


# ----------------------------------------------------------------------------------------
# Routers and fake kernels.


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
    ctx.set_materialize_grads(False)  # the unused output's gradient stays None: no zeros made
    ctx.dim, ctx.keepdim, ctx.backend = dim, keepdim, backend


def _logsumexp_vjp(ctx, g, g_lse):
    x, lse = ctx.saved_tensors
    if g is None and g_lse is None:
        return None, None, None, None
    # Both outputs are the same quantity; a gradient may reach either.
    if g is None:
        g = g_lse.to(x.dtype)
    elif g_lse is not None:
        g = g + g_lse
    dx = call_op("logsumexp_backward", g, x, lse, ctx.dim, ctx.keepdim, ctx.backend)
    return dx, None, None, None


def _logsumexp_eager_vjp(ctx, kernels, g, g_lse):
    """The backward of a prepared eager forward (ops._library._function): the backend's
    kernel on the out's gradient as the backward op's router would hand it over (x's dtype,
    one value per row in row order), with the forward kernel's own float64 lse."""
    if g is None or g_lse is not None:
        return None
    x, lse = ctx.saved_tensors  # unpacked only once the kernel will run (checkpointing)
    if g.dtype != x.dtype:
        g = g.to(x.dtype)
    dx = kernels.logsumexp_backward(g.reshape(-1), x, lse.reshape(-1), ctx.dim)
    return dx, None, None, None


def _logsumexp_jvp(ctx, t, *_):
    x, lse = ctx.saved_tensors
    rows = _Rows(x, ctx.dim, ctx.keepdim)
    dot = rows.reduce(probabilities(x, rows.expand(lse)) * _acc(t))
    return dot.to(x.dtype), dot.to(torch.float64)


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
# vmap rules: the vmapped dim moves to the front and ``dim`` shifts by one (a logical 0-dim
# input becomes a row of one).


def _logsumexp_rule(info, in_dims, x, dim, keepdim, backend):
    x = _front(x, in_dims[0], info.batch_size)
    if x.dim() == 1:
        return ops.logsumexp(x.unsqueeze(1), 1, False, backend), (0, 0)
    return ops.logsumexp(x, wrap_dim("logsumexp", dim, x.dim() - 1) + 1, keepdim, backend), (0, 0)


def _logsumexp_backward_rule(info, in_dims, grad, x, result, dim, keepdim, backend):
    size = info.batch_size
    batched = zip((grad, x, result), in_dims[:3], strict=True)
    grad, x, result = (_front(t, d, size) for t, d in batched)
    if x.dim() == 1:
        dx = ops.logsumexp_backward(grad, x.unsqueeze(1), result, 1, False, backend)
        return dx.squeeze(1), 0
    dim = wrap_dim("logsumexp_backward", dim, x.dim() - 1) + 1
    return ops.logsumexp_backward(grad, x, result, dim, keepdim, backend), 0


# ----------------------------------------------------------------------------------------
# Autocast (CUDA): the input cast to float32.


def _float32_input(x, dim, keepdim, backend):
    return (x.float() if _eligible(x) else x), dim, keepdim, backend


def _fused_reduced(x, dim, keepdim):
    shape = _reduced_shape(x.shape, dim, keepdim)
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.float64)


# ----------------------------------------------------------------------------------------
# Registration.

register(
    "logsumexp",
    "logsumexp(Tensor x, int dim, bool keepdim, str backend) -> (Tensor out, Tensor lse)",
    _logsumexp_route,
    _logsumexp_fake,
    autograd=(_logsumexp_setup, _logsumexp_vjp, _logsumexp_jvp, _logsumexp_eager_vjp),
    vmap=_logsumexp_rule,
    autocast={"cuda": _float32_input},
)
register(
    "logsumexp_backward",
    "logsumexp_backward(Tensor grad, Tensor x, Tensor result, int dim, "
    "bool keepdim, str backend) -> Tensor",
    _logsumexp_backward_route,
    _logsumexp_backward_fake,
    autograd=(_logsumexp_backward_setup, _logsumexp_backward_vjp, _logsumexp_backward_jvp),
    vmap=_logsumexp_backward_rule,
)
register_fused_fake("_fused_logsumexp", _fused_reduced)
register_fused_fake("_fused_logsumexp_backward", lambda grad, x, lse, dim: x.new_empty(x.shape))
