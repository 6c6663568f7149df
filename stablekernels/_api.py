"""The public functions: argument checks, dtype rules, dim handling and backend choice.

Each function checks its arguments the way torch does (same exception types), turns them into
the arguments of one custom op of :mod:`stablekernels._ops`, and picks the backend:

1. ``backend=`` given to the call;
2. else the innermost :func:`use_backend` block of this thread;
3. else the ``STABLEKERNELS_BACKEND`` environment variable (read when stablekernels is
   imported);
4. else automatically from the tensor's device: CUDA -> cuda, triton, torch;
   CPU -> cpp, torch; any other device -> torch (the first that can serve it).

A backend named by 1-3 that cannot serve the call raises
:class:`~stablekernels.BackendUnavailableError` naming the backend, the device and the
reason; only the automatic choice falls back, silently. An unknown name raises ValueError.
"""

from __future__ import annotations

import contextlib
import operator
import threading
from collections.abc import Iterator, Sequence

import torch

from . import _ops, backends
from ._autograd import call_op, direct
from ._ops import check_floating, wrap_dim

_overrides = threading.local()
# use_backend blocks open in any thread: while none is, no thread has an override to look up.
_open_overrides = 0


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine (on at least one of its devices),
    e.g. ``['torch']`` or ``['cpp', 'cuda', 'triton', 'torch']``."""
    return backends.available_backends()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run every stablekernels call of this thread inside the block on backend ``name``
    (unless the call names its own ``backend=``). Blocks nest; the innermost wins.

    Raises ValueError at once for an unknown name; a known backend that cannot serve a call
    raises BackendUnavailableError at that call.
    """
    global _open_overrides
    backends.get_backend(name)
    stack = getattr(_overrides, "stack", None)
    if stack is None:
        stack = _overrides.stack = []
    stack.append(name)
    _open_overrides += 1
    try:
        yield
    finally:
        _open_overrides -= 1
        stack.pop()


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The name of the backend that runs a call on ``device`` (rules in the module doc)."""
    name = backend
    if name is None:
        stack = getattr(_overrides, "stack", None)
        name = stack[-1] if stack else None
    if name is None and backends.ENV_BACKEND is not None:
        name = backends.ENV_BACKEND
        if name not in backends.BACKENDS:
            raise ValueError(
                f"{backends.ENV_VAR}={name!r} names no stablekernels backend; known backends: "
                f"{', '.join(backends.BACKENDS)}"
            )
    if name is None:
        return backends.automatic_backend(device)
    backends.check_serves(name, device)
    return name


# ----------------------------------------------------------------------------------------
# Argument checks.


def _check_tensor(op: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}(): argument 'input' must be Tensor, not {type(x).__name__}")
    if x.is_complex():
        raise NotImplementedError(f"{op}(): complex input ({x.dtype}) is not supported")
    return x


def _check_int(op: str, name: str, value) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(
            f"{op}(): argument '{name}' must be int, not {type(value).__name__}"
        ) from None


def _check_dtype(op: str, dtype) -> torch.dtype | None:
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"{op}(): argument 'dtype' must be torch.dtype, not {type(dtype).__name__}")
    if dtype is not None:
        check_floating(op, "the requested dtype", dtype)
    return dtype


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


def _masked_options(op: str, x: torch.Tensor, dims, scale, mask, causal, causal_offset,
                    masked_rows):  # fmt: skip
    """The masked op's ``(mask, scale, causal_offset, nan_rows)``, or None when none of
    scale, mask and causal is given (the plain op serves the call)."""
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
        masked_rows == "nan",
    )


# ----------------------------------------------------------------------------------------
# The eager path of a call that needs no autograd: what the checks decide from a call's
# types alone (dtype, rank, dim, the requested dtype, the backend serving the device) is
# decided once per combination and kept, so that such a call goes from the public function
# to the backend's kernel with the same checks, the same kernel and the same result, in about
# 1 us of Python instead of 5 (docs/overhead.md). Calls that need autograd, and calls that
# something may see or change (torch.compile, torch.func, autocast, modes, subclasses:
# _autograd.direct), take the general path through the op.

_PREPARED: dict[tuple, tuple | None] = {}


def _plain(x) -> bool:
    return (
        isinstance(x, torch.Tensor)
        and direct((x,))
        and not (x.requires_grad and torch.is_grad_enabled())
    )


def _prepared(key: tuple, prepare, *args) -> tuple | None:
    """The kept answer of ``prepare(*args)`` for ``key`` (None where the general path serves
    the call: an argument it must refuse, or a case it handles itself)."""
    answer = _PREPARED.get(key, _PREPARED)
    if answer is not _PREPARED:
        return answer
    try:
        answer = prepare(*args)
    except (TypeError, ValueError, RuntimeError, IndexError, NotImplementedError):
        answer = None  # the general path raises it, in its words
    _PREPARED[key] = answer
    return answer


def callable_kernel(kernel):
    """A backend's kernel as the fastest callable of it: an extension op's overload is
    called through its C++ function (the overload object adds a Python frame)."""
    return kernel._op if isinstance(kernel, torch._ops.OpOverload) else kernel


def _overriding_backend() -> str | None:
    if not _open_overrides:
        return None
    stack = getattr(_overrides, "stack", None)
    return stack[-1] if stack else None


def _prepare_rows(op, x, dim, dtype, backend, keepdim):
    if x.dim() == 0 or not x.is_floating_point():
        return None
    wrapped = wrap_dim(op, dim, x.dim())
    check_floating(op, "the input", x.dtype)
    kernels = _ops._kernels(op, resolve_backend(backend, x.device), x)
    if op == "logsumexp":
        return callable_kernel(kernels.logsumexp), wrapped, bool(keepdim)
    if dtype is not None and not isinstance(dtype, torch.dtype):
        return None
    out = x.dtype if dtype is None else dtype
    check_floating(op, "the requested dtype", out)
    return callable_kernel(kernels.softmax), wrapped, out


def _fast_rows(op: str, x, dim, dtype, backend, keepdim=None):
    """(kernel, dim, dtype or keepdim) of a plain softmax / log_softmax / logsumexp call over
    one int dim of a floating tensor with dims, or None."""
    if type(dim) is not int or not _plain(x):
        return None
    key = (op, x.dtype, x.device, x.dim(), dim, dtype, keepdim, backend, _overriding_backend())
    answer = _PREPARED.get(key, _PREPARED)
    if answer is _PREPARED:
        answer = _prepared(key, _prepare_rows, op, x, dim, dtype, backend, keepdim)
    return answer


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
# Public functions.


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
            return fast[0](x, fast[1], fast[2], False)
    x, dim, dtype = _softmax_inputs("softmax", x, dim, dtype)
    masked = _masked_options(
        "softmax", x, (wrap_dim("softmax", dim, x.dim()),), scale, mask, causal, causal_offset,
        masked_rows,
    )  # fmt: skip
    if masked is not None:
        mask, scale, offset, nan_rows = masked
        name = resolve_backend(backend, x.device)
        return call_op("masked_softmax", x, mask, scale, offset, dtype, False, nan_rows, name)[0]
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
            return fast[0](x, fast[1], fast[2], True)
    x, dim, dtype = _softmax_inputs("log_softmax", x, dim, dtype)
    masked = _masked_options(
        "log_softmax", x, (wrap_dim("log_softmax", dim, x.dim()),), scale, mask, causal,
        causal_offset, masked_rows,
    )  # fmt: skip
    if masked is not None:
        mask, scale, offset, nan_rows = masked
        name = resolve_backend(backend, x.device)
        return call_op("masked_softmax", x, mask, scale, offset, dtype, True, nan_rows, name)[0]
    return call_op("log_softmax", x, dim, dtype, resolve_backend(backend, x.device))


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
            return fast[0](x, fast[1], fast[2])[0]
    x = _check_tensor("logsumexp", x)
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    keepdim = bool(keepdim)
    dims = _reduce_dims(x, dim)
    name = resolve_backend(backend, x.device)
    masked = _masked_options("logsumexp", x, dims, scale, mask, causal, causal_offset, masked_rows)
    if masked is not None:
        mask, scale, offset, nan_rows = masked
        out = call_op("masked_logsumexp", x, mask, scale, offset, nan_rows, name)[0]
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
