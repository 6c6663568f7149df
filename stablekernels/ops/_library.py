"""What every op module of :mod:`stablekernels.ops` shares: the ``torch.library.Library`` of
the ``stablekernels`` namespace, :func:`register` (called at the bottom of each op module: an
op's schema, router, fake kernel, autograd rules, vmap rule and autocast rule, registered
together), the autograd.Function factory and the ops' Autograd kernel, and
:func:`call_op` / :func:`direct`, through which the public functions and the autograd rules
call the ops.

The router of each op (registered as CompositeExplicitAutograd, so it serves every device)
is the one place that checks the op's arguments (the shared checks:
:mod:`stablekernels.ops._checks`). It handles 0-dim and empty inputs itself, brings the rest
to the preconditions of the backend kernels (:mod:`stablekernels.backends`), and computes
every per-row quantity on row-sized tensors, so that the kernels are the same few passes over
the data on every backend. Outputs are always new contiguous tensors, as torch.softmax's are,
which is what the fake kernels promise to ``torch.compile``. The private kernel ops of the
extension (``_fused_*``) get fake kernels too (:func:`register_fused_fake`), so that a direct
call of one under ``torch.compile`` traces.

Autograd: each op's Autograd kernel is an ``autograd.Function`` with ``setup_context`` (so
that ``torch.func.grad``/``jacrev``/``hessian`` accept it), ``backward``, ``jvp`` (forward
mode: ``torch.func.jvp``/``jacfwd``, ``forward_ad``) and ``generate_vmap_rule`` (its forward,
backward and jvp run under ``vmap`` through the ops' vmap rules). The op itself stays one
opaque node for ``torch.compile`` and ``torch.export``; the Function is what autograd runs.
The backward ops are linear in their incoming gradient, so their derivative along it is the
backward op itself (one fused pass); the terms from the saved forward values are plain torch
ops, which are differentiable again. Everything runs on the backend of the forward (an
argument of every op).

vmap: each rule folds the vmapped dim into the op's own batch and calls the op once, with no
copy where a view does (or, where the op cannot fold a batch, runs one call per sample:
:func:`_per_sample`). Unbatched tensor arguments beside batched ones are expanded (a view;
the ops make their inputs contiguous where they need to). Rules get ``(info, in_dims,
*args)`` and return ``(output, out_dims)``, as ``torch.library.register_vmap`` asks.

Autocast: the dtype policy of torch's own ops, for ours. A rule applies to float16, bfloat16
and float32 tensors of the autocast device, never to float64 (as torch); it is an Autocast
kernel of the op that rewrites its arguments (:func:`_register_autocast`)::

    op                 CUDA                                        CPU
    softmax,           float32 result (``dtype=torch.float32`` set  input dtype (no rule)
    log_softmax        when not given; the input is not copied)
    logsumexp          input cast to float32                       input dtype (no rule)
    (masked too)
    cross_entropy      float32 loss                                float32 loss
    linear_cross_      float32 loss; inputs as given, computed     as CUDA
    entropy            in float32 (no matmul in a half type)
"""

from __future__ import annotations

import torch
from torch._C._functorch import TransformType
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
from torch._functorch.utils import enable_single_level_autograd_function
from torch.autograd import forward_ad

from .. import backends
from .._numerics import accumulation_dtype

NAMESPACE = "stablekernels"
# Of every op registered (register()): its schema and its router, by name.
SCHEMAS: dict[str, str] = {}
ROUTERS: dict = {}

_lib = torch.library.Library(NAMESPACE, "DEF")
ops = torch.ops.stablekernels


# ----------------------------------------------------------------------------------------
# Helpers of the autograd rules.


def _acc(t: torch.Tensor) -> torch.Tensor:
    return t.to(accumulation_dtype(t.dtype))


def _row_sum(t: torch.Tensor, dim: int) -> torch.Tensor:
    return t.sum(dim, keepdim=True)


def _not_written(what: str, op: str = "linear_cross_entropy"):
    def refuse(*_args):
        raise NotImplementedError(
            f"stablekernels::{op}: {what} is not supported (only first-order "
            "reverse mode: .backward(), torch.autograd.grad, torch.func.grad/vjp)"
        )

    return refuse


def no_context(ctx, inputs, output):
    """The setup_context of an op whose autograd rules all refuse: nothing saved."""


# ----------------------------------------------------------------------------------------
# Registration: one autograd.Function per op, run by the op's Autograd kernel.


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


class Prepared:
    """The Function's forward of an eager call whose checks were decided ahead
    (:mod:`stablekernels._api`'s prepared path, :func:`apply_prepared`): ``run`` takes the
    op's arguments and returns what its router would, from the backend's kernel alone;
    ``kernels`` is that backend's record, which the op's eager vjp (``register``) calls."""

    __slots__ = ("run", "kernels")

    def __init__(self, run, kernels):
        self.run, self.kernels = run, kernels


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


def _function(
    name: str, setup_context, backward, jvp, eager_vjp=None
) -> type[torch.autograd.Function]:
    """The autograd.Function of op ``name``, applied as ``apply(call, *args)``: its forward
    redispatches the op below autograd with the grad modes of the call (a Function's forward
    runs with both off, but a torch.func level below this one must still see them on to
    record its own graph, as it does for torch's ops).

    ``eager_vjp(ctx, kernels, *grads)``, where given, is the backward of a :class:`Prepared`
    forward run eagerly: the backward kernel of the forward's backend called on the saved
    tensors, with no check the forward did not already make; it returns None to leave a case
    to ``backward`` (a missing gradient, say), deciding that before it unpacks the saved
    tensors (activation checkpointing lets them be unpacked once). It is used only when the
    backward itself needs no autograd (no ``create_graph``) and :func:`direct` allows it."""
    op = getattr(ops, name).default

    route = ROUTERS[name]

    def forward(call, *args):
        if call is DIRECT:  # applied by call_op: nothing below autograd but the router
            return route(*args)
        if call.__class__ is Prepared:  # applied by apply_prepared: the kernel alone
            return call.run(*args)
        with (
            torch._C._AutoDispatchBelowAutograd(),
            torch.autograd.grad_mode.set_grad_enabled(call.grad_enabled),
            forward_ad._set_fwd_grad_enabled(call.fwd_grad_enabled),
        ):
            return op.redispatch(call.keyset & _BELOW_AUTOGRAD, *args)

    def setup(ctx, inputs, output):
        call = inputs[0]
        eager = eager_vjp is not None and call.__class__ is Prepared
        ctx.kernels = call.kernels if eager else None
        setup_context(ctx, inputs[1:], output)

    def vjp(ctx, *grads):
        if ctx.kernels is not None and not torch.is_grad_enabled() and direct(grads):
            dx = eager_vjp(ctx, ctx.kernels, *grads)
            if dx is not None:
                return (None, *dx)
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


def _register_autograd(name: str, setup_context, backward, jvp, eager_vjp=None) -> None:
    function = FUNCTIONS[name] = _function(name, setup_context, backward, jvp, eager_vjp)
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


def apply_prepared(name: str, prepared: Prepared, *args):
    """Op ``name`` on ``args`` through its Function, the forward being ``prepared.run``: for
    an eager call that needs autograd and that :func:`direct` allows, whose checks the
    public function decided ahead. The autograd rules are the op's own."""
    return FUNCTIONS[name].apply(prepared, *args)


# ----------------------------------------------------------------------------------------
# vmap: shared pieces of the rules.


def _front(t: torch.Tensor | None, in_dim: int | None, size: int) -> torch.Tensor | None:
    """``t`` with its vmapped dim first; an unbatched tensor expanded to ``size`` there."""
    if t is None:
        return None
    if in_dim is None:
        return t.expand(size, *t.shape)
    return t.movedim(in_dim, 0)


def _per_sample(op, info, in_dims, args):
    """One call per sample, outputs stacked: for batches the op cannot fold."""
    results = []
    for i in range(info.batch_size):
        sample = [a if d is None else a.select(d, i) for a, d in zip(args, in_dims, strict=True)]
        results.append(op(*sample))
    if isinstance(results[0], tuple):
        return tuple(torch.stack(r) for r in zip(*results, strict=True)), (0,) * len(results[0])
    return torch.stack(results), 0


def _per_sample_rule(name: str):
    def rule(info, in_dims, *args):
        return _per_sample(getattr(ops, name).default, info, in_dims, args)

    return rule


# ----------------------------------------------------------------------------------------
# Autocast: shared pieces of the rules.

_AUTOCAST_HALVES_AND_FLOAT = (torch.float16, torch.bfloat16, torch.float32)
# Device types whose autocast runs cross_entropy in float32 (torch: nll_loss on CUDA,
# cross_entropy_loss on CPU).
_FLOAT32_LOSS_DEVICES = ("cpu", "cuda")


def _eligible(t: torch.Tensor) -> bool:
    return t.dtype in _AUTOCAST_HALVES_AND_FLOAT


def _register_autocast(name: str, device_type: str, adjust) -> None:
    """An Autocast kernel for op ``name``: ``adjust`` rewrites the arguments, then the op runs
    with this autocast key excluded (as torch's own autocast kernels do)."""
    op = getattr(ops, name).default
    key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    key = getattr(torch._C.DispatchKey, key_name)

    def kernel(*args):
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return op(*adjust(*args))

    _lib.impl(name, kernel, key_name)
    # The Python dispatcher (torch.compile's tracing) looks here first.
    op.py_impl(key)(kernel)


def _as_given(*args):
    return args


# ----------------------------------------------------------------------------------------
# Registration of an op, all of it at once.


def register(name: str, schema: str, router, fake, autograd, vmap, autocast=None) -> None:
    """Define op ``stablekernels::<name>`` with ``schema`` and register its ``router``
    (CompositeExplicitAutograd: every device), its ``fake`` kernel, its autograd rules
    ``(setup_context, vjp, jvp)`` or ``(setup_context, vjp, jvp, eager_vjp)`` (the Autograd
    kernel; ``eager_vjp``: :func:`_function`), its ``vmap`` rule and its autocast rules
    (``{device type: adjust}``, :func:`_register_autocast`)."""
    SCHEMAS[name] = schema
    _lib.define(schema)
    ROUTERS[name] = router
    _lib.impl(name, router, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_lib)
    _register_autograd(name, *autograd)
    torch.library.register_vmap(f"{NAMESPACE}::{name}", vmap, lib=_lib)
    for device_type, adjust in (autocast or {}).items():
        _register_autocast(name, device_type, adjust)


def register_fused_fake(name: str, fake) -> None:
    """The fake kernel of the extension's private kernel op ``name`` (its preconditions are
    the routers'); nothing where stablekernels._C did not load (the op does not exist)."""
    if backends.EXTENSION:
        torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_lib)
