"""The backend registry: which implementations stablekernels knows, where each can run, and
where its kernels live.

A backend is a module of six kernel functions with the signatures of
:mod:`stablekernels.backends.torch_ref`::

    softmax(x, dim, out_dtype)             log_softmax(x, dim, out_dtype)
    logsumexp(x, dim, keepdim) -> (out in x.dtype, the same in float64)
    softmax_backward(grad, output, dim, input_dtype)
    log_softmax_backward(grad, output, dim, input_dtype)
    logsumexp_backward(grad, x, result, dim, keepdim)

Each receives a floating tensor with at least one dimension and no zero-size dimension, and
a ``dim`` already wrapped to be non-negative; it returns a new contiguous tensor. The ops of
:mod:`stablekernels._library` route every call to one of these modules by name, so a new
backend plugs in by adding an entry here: nothing in the ops, the API or the tests changes.

Whether a backend can serve a device is decided from facts gathered once at import (is the
extension built, is triton installed, is there a GPU), so that the decision is cheap and
``torch.compile`` can trace it without a graph break.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot serve a call (not built, or wrong device)."""


def _probe_extension() -> str | None:
    """None if ``stablekernels._C`` is importable, else why not."""
    if importlib.util.find_spec("stablekernels._C") is None:
        return (
            "stablekernels._C is not built (install with `pip install --no-build-isolation .`; "
            "STABLEKERNELS_NO_EXTENSION=1 skips it)"
        )
    try:
        importlib.import_module("stablekernels._C")
    except ImportError as exc:  # built against another torch, missing symbols, ...
        return f"stablekernels._C failed to import: {exc}"
    return None


_EXTENSION_PROBLEM = _probe_extension()
_CUDA_PRESENT = torch.cuda.is_available()


def _extension_has_kernels(dispatch_key: str) -> bool:
    return _EXTENSION_PROBLEM is None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "stablekernels::fused_softmax", dispatch_key
    )


_EXTENSION_HAS_CUDA = _extension_has_kernels("CUDA")


def _serves_any_device(device_type: str) -> str | None:
    return None


def _cpp_reason(device_type: str) -> str | None:
    if device_type != "cpu":
        return "the cpp backend runs CPU tensors only"
    return _EXTENSION_PROBLEM


def _cuda_reason(device_type: str) -> str | None:
    if device_type != "cuda":
        return "the cuda backend runs CUDA tensors only"
    if _EXTENSION_PROBLEM is not None:
        return _EXTENSION_PROBLEM
    if not _EXTENSION_HAS_CUDA:
        return "this build of stablekernels._C has no CUDA kernels (built without CUDA)"
    return None


_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
# Read once, at import, like TRITON_INTERPRET itself (triton reads it when imported).
TRITON_INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_reason(device_type: str) -> str | None:
    if not _TRITON_INSTALLED:
        return "triton is not installed"
    if TRITON_INTERPRETER:
        if device_type == "cpu":
            return None
        return "under TRITON_INTERPRET=1 the triton backend runs CPU tensors only"
    if device_type == "cpu":
        return "CPU tensors need the Triton interpreter (TRITON_INTERPRET=1, set before import)"
    if device_type != "cuda":
        return "the triton backend runs CUDA tensors"
    return None


@dataclass(frozen=True)
class Backend:
    """One implementation of the ops.

    ``reason(device_type)`` says why the backend cannot run tensors of that device type, or
    returns None when it can. ``home`` is the device type it is made for. ``module`` names
    the module holding its kernel functions; it is imported on first use, so an unused
    backend costs nothing at import.
    """

    name: str
    summary: str
    home: str
    module: str
    reason: Callable[[str], str | None]

    def status(self) -> str:
        """One line for people: where it runs on this machine, or why it does not."""
        serves = [t for t in local_device_types() if self.reason(t) is None]
        if serves:
            return "available for " + ", ".join(serves)
        if self.home not in local_device_types():
            return f"not available: no {self.home.upper()} device on this machine"
        return f"not available: {self.reason(self.home)}"

    def kernels(self) -> ModuleType:
        return importlib.import_module(self.module)


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend(
            "torch",
            "pure PyTorch, any device",
            "cpu",
            "stablekernels.backends.torch_ref",
            _serves_any_device,
        ),
        Backend(
            "cpp",
            "C++ kernels in stablekernels._C, CPU tensors",
            "cpu",
            "stablekernels.backends.extension",
            _cpp_reason,
        ),
        Backend(
            "cuda",
            "CUDA kernels in stablekernels._C, CUDA tensors",
            "cuda",
            "stablekernels.backends.extension",
            _cuda_reason,
        ),
        Backend(
            "triton",
            "Triton kernels, CUDA tensors (CPU under TRITON_INTERPRET=1)",
            "cuda",
            "stablekernels.backends.triton",
            _triton_reason,
        ),
    )
}

# The automatic choice for a tensor's device type: the first backend that can serve it.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("cuda", "triton", "torch"),
    "cpu": ("cpp", "torch"),
}
_AUTO_ORDER_OTHER = ("torch",)


def get_backend(name: str) -> Backend:
    """The backend called ``name``; ValueError naming the known ones if there is none."""
    backend = BACKENDS.get(name) if isinstance(name, str) else None
    if backend is None:
        raise ValueError(
            f"unknown stablekernels backend {name!r}; known backends: {', '.join(BACKENDS)}"
        )
    return backend


def check_serves(name: str, device: torch.device) -> None:
    """Raise BackendUnavailableError naming backend, device and reason if ``name`` can't run
    tensors on ``device``."""
    reason = get_backend(name).reason(device.type)
    if reason is not None:
        raise BackendUnavailableError(
            f"stablekernels backend {name!r} cannot run on device {str(device)!r}: {reason}"
        )


def automatic_backend(device: torch.device) -> str:
    """The first backend of the automatic order that can serve ``device`` (always one)."""
    for name in AUTO_ORDER.get(device.type, _AUTO_ORDER_OTHER):
        if BACKENDS[name].reason(device.type) is None:
            return name
    return "torch"


def local_device_types() -> list[str]:
    """Device types this machine has: cpu, and cuda where a GPU is visible."""
    return ["cpu", "cuda"] if _CUDA_PRESENT else ["cpu"]


def available_backends() -> list[str]:
    """Names of the backends that can run on at least one device of this machine."""
    return [
        name
        for name, backend in BACKENDS.items()
        if any(backend.reason(t) is None for t in local_device_types())
    ]


ENV_VAR = "STABLEKERNELS_BACKEND"
# Read once, at import: torch.compile does not guard on os.environ, so a value read per call
# could silently go stale inside a compiled graph.
ENV_BACKEND: str | None = os.environ.get(ENV_VAR) or None
