"""What the public functions share: argument checks, backend choice and the eager path.

Each public function (in the op modules, :mod:`stablekernels.ops`, and
:mod:`stablekernels._cross_entropy` / :mod:`stablekernels._linear_cross_entropy`) checks its
arguments the way torch does (same exception types), turns them into the arguments of one
custom op, and picks the backend:

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
from collections.abc import Iterator

import torch

from . import backends
from .ops._checks import _kernels, check_floating, wrap_dim
from .ops._library import Prepared, direct

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
    """``value`` as an int (anything with ``__index__``, but not a bool, as torch's int
    arguments); TypeError naming the argument otherwise."""
    if isinstance(value, bool):
        raise TypeError(f"{op}(): argument '{name}' must be int, not bool")
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


# ----------------------------------------------------------------------------------------
# The prepared path of an eager call: what the checks decide from a call's types alone
# (dtype, rank, dim, the requested dtype, the backend serving the device) is decided once per
# combination and kept, so that such a call goes from the public function to the backend's
# kernel with the same checks, the same kernel and the same result, in about 1 us of Python
# instead of 5 (docs/overhead.md). A call that needs autograd goes to the kernel through the
# op's own autograd.Function (stablekernels.ops._library.apply_prepared), so the backward is
# the op's. Calls that something may see or change (torch.compile, torch.func, forward-mode
# AD, autocast, modes, subclasses: stablekernels.ops._library.direct) take the general path
# through the op.

_PREPARED: dict[tuple, object] = {}


def _plain(x) -> bool:
    """Whether a call on ``x`` may take the prepared path (:func:`direct`); whether it needs
    autograd is the caller's question (:func:`needs_grad`)."""
    return isinstance(x, torch.Tensor) and direct((x,))


def needs_grad(x: torch.Tensor) -> bool:
    return x.requires_grad and torch.is_grad_enabled()


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


class PreparedRows:
    """A plain softmax / log_softmax / logsumexp call decided ahead: ``kernel(x, dim, out)``
    (softmax: ``out`` the output dtype, the kernel taking ``log`` after it; logsumexp:
    ``out`` is keepdim), the resolved ``backend`` name, and ``autograd``, the op's forward
    from the kernel alone for :func:`~stablekernels.ops._library.apply_prepared`."""

    __slots__ = ("kernel", "dim", "out", "backend", "autograd")

    def __init__(self, kernel, dim, out, backend, autograd):
        self.kernel, self.dim, self.out = kernel, dim, out
        self.backend, self.autograd = backend, autograd


def _prepare_rows(op, x, dim, dtype, backend, keepdim):
    if x.dim() == 0 or not x.is_floating_point():
        return None
    wrapped = wrap_dim(op, dim, x.dim())
    check_floating(op, "the input", x.dtype)
    name = resolve_backend(backend, x.device)
    kernels = _kernels(op, name, x)
    if op == "logsumexp":
        kernel, keep = callable_kernel(kernels.logsumexp), bool(keepdim)
        # The op's arguments: (x, dim, keepdim, backend).
        forward = Prepared(lambda x, dim, keepdim, backend: kernel(x, dim, keep), kernels)
        return PreparedRows(kernel, wrapped, keep, name, forward)
    if dtype is not None and not isinstance(dtype, torch.dtype):
        return None
    out = x.dtype if dtype is None else dtype
    check_floating(op, "the requested dtype", out)
    kernel, log = callable_kernel(kernels.softmax), op == "log_softmax"
    # The op's arguments: (x, dim, dtype, backend).
    forward = Prepared(lambda x, dim, dtype, backend: kernel(x, dim, out, log), kernels)
    return PreparedRows(kernel, wrapped, out, name, forward)


def _fast_rows(op: str, x, dim, dtype, backend, keepdim=None) -> PreparedRows | None:
    """The prepared call of a softmax / log_softmax / logsumexp over one int dim of a
    floating tensor with dims, which :func:`direct` allows (with or without autograd), or
    None."""
    if type(dim) is not int or not _plain(x):
        return None
    key = (op, x.dtype, x.device, x.dim(), dim, dtype, keepdim, backend, _overriding_backend())
    answer = _PREPARED.get(key, _PREPARED)
    if answer is _PREPARED:
        answer = _prepared(key, _prepare_rows, op, x, dim, dtype, backend, keepdim)
    return answer
