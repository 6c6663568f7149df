"""Who is measured: every stablekernels backend that serves the device, torch eager,
torch.compile, the naive formula, and the peers (Liger-Kernel, quack) where importable.

A provider turns (op, dim) into a forward function ``x -> out``; the runner derives the
backward from it through autograd, as users call it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import stablekernels as sk
from stablekernels import backends

Forward = Callable[[torch.Tensor], torch.Tensor]

TORCH_OPS = {
    "softmax": torch.softmax,
    "log_softmax": torch.log_softmax,
    "logsumexp": torch.logsumexp,
}


@dataclass
class Provider:
    """``make(op, dim)`` returns the forward function; ``ops`` the ops it has; ``devices``
    the device types it runs; ``last_dim_only`` when it handles dim=-1 of 2-D inputs only;
    ``compiles`` when its first call compiles (its time is reported apart)."""

    name: str
    make: Callable[[str, int], Forward]
    ops: tuple[str, ...]
    devices: tuple[str, ...] = ("cpu", "cuda")
    last_dim_only: bool = False
    compiles: bool = False
    _cache: dict = field(default_factory=dict, repr=False)

    def forward(self, op: str, dim: int) -> Forward:
        key = (op, dim)
        if key not in self._cache:
            self._cache[key] = self.make(op, dim)
        return self._cache[key]

    def serves(self, op: str, shape: tuple[int, ...], dim: int, device: str) -> bool:
        if op not in self.ops or device not in self.devices:
            return False
        return not self.last_dim_only or (len(shape) == 2 and dim in (-1, 1))


def _stablekernels(backend: str) -> Provider:
    def make(op, dim):
        fn = getattr(sk, op)
        return lambda x: fn(x, dim, backend=backend)

    serves = tuple(t for t in ("cpu", "cuda") if backends.BACKENDS[backend].reason(t) is None)
    return Provider(
        f"sk-{backend}",
        make,
        ("softmax", "log_softmax", "logsumexp"),
        serves,
        compiles=backend == "triton",
    )


def _torch_eager() -> Provider:
    def make(op, dim):
        fn = TORCH_OPS[op]
        return lambda x: fn(x, dim)

    return Provider("torch", make, tuple(TORCH_OPS))


def _torch_compile() -> Provider:
    # Static shapes give the best code torch.compile makes for each shape, at one compile
    # per shape and dtype. A whole run recompiles the same function far more often than
    # dynamo's default limit (8), after which it would silently run eager: raise the limit,
    # and make hitting it an error rather than a wrong label.
    dynamo_config = torch._dynamo.config
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 1024)
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 4096)
    dynamo_config.fail_on_recompile_limit_hit = True

    def make(op, dim):
        fn = TORCH_OPS[op]
        return torch.compile(lambda x: fn(x, dim), dynamic=False)

    return Provider("torch.compile", make, tuple(TORCH_OPS), compiles=True)


def _naive() -> Provider:
    def make(op, dim):
        fn = getattr(sk.naive, op)
        return lambda x: fn(x, dim)

    return Provider("naive", make, ("softmax", "log_softmax", "logsumexp"))


def _liger() -> Provider | None:
    try:
        module = importlib.import_module("liger_kernel.ops.softmax")
    except Exception:  # not installed, or no GPU stack behind it
        return None
    function = module.LigerSoftmaxFunction
    return Provider(
        "liger",
        lambda op, dim: function.apply,
        ("softmax",),
        ("cuda",),
        last_dim_only=True,
        compiles=True,
    )


def _quack() -> Provider | None:
    try:
        module = importlib.import_module("quack.softmax")
    except Exception:
        return None
    return Provider(
        "quack",
        lambda op, dim: module.softmax,
        ("softmax",),
        ("cuda",),
        last_dim_only=True,
        compiles=True,
    )


def all_providers(device: str) -> list[Provider]:
    """Every provider that can run on ``device`` here, stablekernels backends first."""
    found = [_stablekernels(b) for b in sk.available_backends()]
    found += [_torch_eager(), _torch_compile(), _naive()]
    found += [p for p in (_liger(), _quack()) if p is not None]
    return [p for p in found if device in p.devices]
