"""Who is measured: every stablekernels backend that serves the device, torch eager,
torch.compile, the naive formula, and the peers (Liger-Kernel, quack) where importable.

A provider turns (op, dim) into a forward function ``x -> out`` (``(x, target) -> per-row
losses`` for cross_entropy); the runner derives the backward from it through autograd, as
users call it.
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
SOFTMAX_OPS = tuple(TORCH_OPS)
ALL_OPS = (*SOFTMAX_OPS, "cross_entropy")


def _torch_cross_entropy(x, target):
    return torch.nn.functional.cross_entropy(x, target, reduction="none")


def _naive_cross_entropy(x, target):
    """-log(exp(x_t) / sum(exp(x))): the textbook softmax, then its log at the target."""
    return -torch.log(sk.naive.softmax(x, -1)).gather(1, target[:, None])[:, 0]


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
        if op == "cross_entropy":
            return lambda x, t: sk.cross_entropy(x, t, reduction="none", backend=backend)
        fn = getattr(sk, op)
        return lambda x: fn(x, dim, backend=backend)

    serves = tuple(t for t in ("cpu", "cuda") if backends.BACKENDS[backend].supports(t))
    return Provider(f"sk-{backend}", make, ALL_OPS, serves, compiles=backend == "triton")


def _torch_eager() -> Provider:
    def make(op, dim):
        if op == "cross_entropy":
            return _torch_cross_entropy
        fn = TORCH_OPS[op]
        return lambda x: fn(x, dim)

    return Provider("torch", make, ALL_OPS)


def _torch_compile() -> Provider:
    # Static shapes give the best code torch.compile makes for each shape, at one compile
    # per shape and dtype. A whole run recompiles the same function far more often than
    # dynamo's default limit (8), after which it would silently run eager: raise the limit,
    # and make hitting it an error rather than a wrong label.
    dynamo_config = torch._dynamo.config
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 1024)
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 4096)
    dynamo_config.fail_on_recompile_limit_hit = True
    # The backward is timed with retain_graph=True (one forward graph, many backwards), which
    # compiled backwards that donate their buffers refuse.
    torch._functorch.config.donated_buffer = False

    def make(op, dim):
        if op == "cross_entropy":
            return torch.compile(lambda x, t: _torch_cross_entropy(x, t), dynamic=False)
        fn = TORCH_OPS[op]
        return torch.compile(lambda x: fn(x, dim), dynamic=False)

    return Provider("torch.compile", make, ALL_OPS, compiles=True)


def _naive() -> Provider:
    def make(op, dim):
        if op == "cross_entropy":
            return _naive_cross_entropy
        fn = getattr(sk.naive, op)
        return lambda x: fn(x, dim)

    return Provider("naive", make, ALL_OPS)


def _liger() -> Provider | None:
    try:
        softmax = importlib.import_module("liger_kernel.ops.softmax").LigerSoftmaxFunction
        cross_entropy = importlib.import_module(
            "liger_kernel.transformers.cross_entropy"
        ).LigerCrossEntropyLoss(reduction="none")
    except Exception:  # not installed, or no GPU stack behind it
        return None

    def make(op, dim):
        return cross_entropy if op == "cross_entropy" else softmax.apply

    return Provider(
        "liger", make, ("softmax", "cross_entropy"), ("cuda",), last_dim_only=True, compiles=True
    )


def _quack() -> Provider | None:
    try:
        softmax = importlib.import_module("quack.softmax").softmax
        cross_entropy = importlib.import_module("quack.cross_entropy").cross_entropy
    except Exception:
        return None

    def make(op, dim):
        return cross_entropy if op == "cross_entropy" else softmax

    return Provider(
        "quack", make, ("softmax", "cross_entropy"), ("cuda",), last_dim_only=True, compiles=True
    )


def all_providers(device: str) -> list[Provider]:
    """Every provider that can run on ``device`` here, stablekernels backends first."""
    found = [_stablekernels(b) for b in sk.available_backends()]
    found += [_torch_eager(), _torch_compile(), _naive()]
    found += [p for p in (_liger(), _quack()) if p is not None]
    return [p for p in found if device in p.devices]
