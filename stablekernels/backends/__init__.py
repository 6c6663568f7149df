"""The backend registry: which backends exist, where each can run, and how each loads its
kernels, a :class:`~stablekernels.backends.contract.Kernels` record that meets the
contract of :mod:`stablekernels.backends.contract` (the signatures, the preconditions).

Whether a backend can serve a device type is decided from facts gathered once at import (is
the extension built, is triton installed, is there a GPU) and, for triton, whether it
imports, asked once where it would serve (a broken triton is passed over with one warning),
so that the decision is cheap and ``torch.compile`` can trace it without a graph break.
Each backend's kernels are loaded (and their modules imported) on first use, and checked
against the contract then.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.machinery
import importlib.util
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .contract import KERNEL_ARGUMENTS, Kernels, argument_names, check_kernels

__all__ = [  # the contract, re-exported: backends.Kernels is what backends import
    "KERNEL_ARGUMENTS",
    "Kernels",
    "argument_names",
    "check_kernels",
]


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot serve a call (not built, or wrong device)."""


@dataclass(frozen=True)
class Support:
    """Whether a backend can serve a device type: truthy if it can, else falsy with the
    reason in words."""

    reason: str | None = None

    def __bool__(self) -> bool:
        return self.reason is None


YES = Support()


# ----------------------------------------------------------------------------------------
# Facts about this machine, gathered once.


def extension_file(package_dir: str) -> str | None:
    """The compiled ``_C`` extension in the package folder ``package_dir``, if it has one."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(package_dir, "_C" + suffix)
        if os.path.isfile(path):
            return path
    return None


def missing_extension_reason(package_dir: str, path_entries: list[str]) -> str:
    """Why ``stablekernels._C`` is missing from the package imported from the folder
    ``package_dir``, and the fix, given the import path ``path_entries`` (``sys.path``).

    From a repository root, ``python -m stablekernels`` imports the source folder, which has
    no extension after a plain ``pip install .`` (the extension went to site-packages): then
    the copy with the extension further down the path is named. A source tree (``setup.py``
    beside the package) with no built copy anywhere is built in place (editable install)."""
    package_dir = os.path.realpath(package_dir)
    root = os.path.dirname(package_dir)
    source_tree = os.path.isfile(os.path.join(root, "setup.py"))
    this, fix = (
        (
            "a source tree",
            "install in editable mode (`pip install --no-build-isolation -e .`) "
            "so the source tree has it",
        )
        if source_tree
        else ("a copy", "take that folder off sys.path so the installed copy is imported")
    )
    for entry in path_entries:
        if not isinstance(entry, str) or os.path.realpath(entry or os.curdir) == root:
            continue
        spec = importlib.machinery.PathFinder.find_spec("stablekernels", [entry])
        for location in (spec.submodule_search_locations or []) if spec else []:
            if os.path.realpath(location) != package_dir and extension_file(location):
                return (
                    f"stablekernels was imported from {package_dir}, {this} without the built "
                    f"extension; an installed copy with the extension is at {location}, also on "
                    f"sys.path. Run from another folder, or {fix}"
                )
    if source_tree:
        return (
            f"stablekernels._C is not built: stablekernels was imported from the source tree "
            f"{root} and no built copy is on sys.path; build it in place with "
            f'`pip install --no-build-isolation -e ".[test]"` from {root}'
        )
    return (
        "stablekernels._C is not built (install with `pip install --no-build-isolation .`; "
        "STABLEKERNELS_NO_EXTENSION=1 skips it)"
    )


def _probe_extension() -> Support:
    """Whether ``stablekernels._C`` imports and registers the kernels of this contract."""
    if importlib.util.find_spec("stablekernels._C") is None:
        package_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return Support(missing_extension_reason(package_dir, sys.path))
    try:
        from .. import _C  # noqa: F401  (registers the _fused_* ops)
    except ImportError as exc:  # built against another torch, missing symbols, ...
        return _broken(
            f"stablekernels._C failed to import ({exc}); it was most likely built against "
            f"another torch than the installed {torch.__version__}"
        )
    if not hasattr(torch.ops.stablekernels, "_fused_softmax"):
        return _broken("stablekernels._C is stale (built from older sources)")
    return YES


def _broken(reason: str) -> Support:
    """A built extension that cannot be used: warned about once, at import, with the fix,
    since every call would otherwise run on the slower torch backend without a word."""
    warnings.warn(
        f"{reason}. The cpp and cuda backends are unavailable, and calls fall back to the "
        "torch backend (STABLEKERNELS_BACKEND=cpp or backend='cpp' raise instead). Fix: "
        "rebuild against the installed torch with `pip install --no-build-isolation "
        "--force-reinstall .` from the source, or install the torch it was built for.",
        RuntimeWarning,
        stacklevel=2,
    )
    return Support(f"{reason}: rebuild it against the installed torch")


EXTENSION = _probe_extension()
_CUDA_PRESENT = torch.cuda.is_available()
_EXTENSION_HAS_CUDA = bool(EXTENSION) and torch._C._dispatch_has_kernel_for_dispatch_key(
    "stablekernels::_fused_softmax", "CUDA"
)
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
# Read once, at import, like TRITON_INTERPRET itself (triton reads it when imported).
TRITON_INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ----------------------------------------------------------------------------------------
# Where each backend runs, and how its kernels load.


def _torch_supports(device_type: str) -> Support:
    return YES


def _cpp_supports(device_type: str) -> Support:
    if device_type != "cpu":
        return Support("the cpp backend runs CPU tensors only")
    return EXTENSION


def _cuda_supports(device_type: str) -> Support:
    if device_type != "cuda":
        return Support("the cuda backend runs CUDA tensors only")
    if not EXTENSION:
        return EXTENSION
    if not _EXTENSION_HAS_CUDA:
        return Support("this build of stablekernels._C has no CUDA kernels (built without CUDA)")
    return YES


def _triton_supports(device_type: str) -> Support:
    if not _TRITON_INSTALLED:
        return Support("triton is not installed")
    if TRITON_INTERPRETER:
        if device_type == "cpu":
            return _triton_imports()
        return Support("under TRITON_INTERPRET=1 the triton backend runs CPU tensors only")
    if device_type == "cpu":
        return Support(
            "CPU tensors need the Triton interpreter (TRITON_INTERPRET=1, set before import)"
        )
    if device_type != "cuda":
        return Support("the triton backend runs CUDA tensors")
    return _triton_imports()


def _import_triton_backend() -> None:
    from . import triton  # noqa: F401  (imports triton and compiles nothing yet)


_TRITON_IMPORTS: list[Support] = []  # the answer of _triton_imports, once asked


def _triton_imports() -> Support:
    """Whether triton (and the triton backend's module) imports: asked once, the first time
    the triton backend would otherwise serve a device type, so that a triton that is
    installed but broken (a wrong version, a missing library) is found before a call needs
    it. A failure is warned about once, and the automatic choice passes over the backend.
    (A plain list keeps the answer: torch.compile warns about tracing a functools cache.)"""
    if _TRITON_IMPORTS:
        return _TRITON_IMPORTS[0]
    try:
        _import_triton_backend()
        answer = YES
    except Exception as exc:  # any failure of a third-party import: ImportError, RuntimeError
        answer = Support(f"triton is installed but failed to import ({type(exc).__name__}: {exc})")
        warnings.warn(
            f"{answer.reason}; stablekernels' triton backend is unavailable, and calls that "
            "would use it automatically use the next backend (backend='triton' raises instead)",
            RuntimeWarning,
            stacklevel=2,
        )
    _TRITON_IMPORTS.append(answer)
    return answer


def _load_torch() -> Kernels:
    from . import torch_ref

    return torch_ref.KERNELS


def _load_cpp() -> Kernels:
    in_place = torch.ops.stablekernels._fused_cross_entropy_backward_inplace.default
    return dataclasses.replace(_load_extension(), cross_entropy_backward_inplace=in_place)


def _load_extension() -> Kernels:
    # The CPU and CUDA kernels of stablekernels._C are the same ops, dispatched by device.
    ops = torch.ops.stablekernels
    return Kernels(  # the overloads themselves: a call skips the packet's overload lookup
        softmax=ops._fused_softmax.default,
        softmax_backward=ops._fused_softmax_backward.default,
        logsumexp=ops._fused_logsumexp.default,
        logsumexp_backward=ops._fused_logsumexp_backward.default,
        cross_entropy=ops._fused_cross_entropy.default,
        cross_entropy_backward=ops._fused_cross_entropy_backward.default,
        cross_entropy_loss=ops._fused_cross_entropy_loss.default,
        cross_entropy_loss_backward=ops._fused_cross_entropy_loss_backward.default,
        masked_softmax=ops._fused_masked_softmax.default,
        cross_entropy_tile=ops._fused_cross_entropy_tile.default,
        cross_entropy_tile_backward=ops._fused_cross_entropy_tile_backward.default,
        masked_softmax_backward=ops._fused_masked_softmax_backward.default,
    )


def _load_triton() -> Kernels:
    from . import triton

    return triton.KERNELS


@dataclass(frozen=True)
class Backend:
    """One implementation of the ops.

    ``supports(device_type)`` says whether it can run tensors of that device type (a
    :class:`Support`); ``home`` is the device type it is made for; ``load`` imports its
    module and returns its :class:`Kernels` (called once, through :meth:`kernels`).
    """

    name: str
    summary: str
    home: str
    supports: Callable[[str], Support]
    load: Callable[[], Kernels]

    def status(self) -> str:
        """One line for people: where it runs on this machine, or why it does not."""
        serves = [t for t in local_device_types() if self.supports(t)]
        if serves:
            return "available for " + ", ".join(serves)
        if self.home not in local_device_types():
            return f"not available: no {self.home.upper()} device on this machine"
        return f"not available: {self.supports(self.home).reason}"

    def kernels(self) -> Kernels:
        return _loaded_kernels(self)


@functools.cache
def _loaded_kernels(backend: Backend) -> Kernels:
    return check_kernels(backend.name, backend.load())


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("torch", "pure PyTorch, any device", "cpu", _torch_supports, _load_torch),
        Backend(
            "cpp",
            "C++ kernels in stablekernels._C, CPU tensors",
            "cpu",
            _cpp_supports,
            _load_cpp,
        ),
        Backend(
            "cuda",
            "CUDA kernels in stablekernels._C, CUDA tensors",
            "cuda",
            _cuda_supports,
            _load_extension,
        ),
        Backend(
            "triton",
            "Triton kernels, CUDA tensors (CPU under TRITON_INTERPRET=1)",
            "cuda",
            _triton_supports,
            _load_triton,
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


def check_serves(name: str, device: torch.device) -> Backend:
    """The backend ``name``, or BackendUnavailableError naming backend, device and reason if
    it can't run tensors on ``device``."""
    served = _SERVES.get((name, device.type))
    if served is not None:
        return served
    backend = get_backend(name)
    support = backend.supports(device.type)
    if support:
        _SERVES[(name, device.type)] = backend
    else:
        raise BackendUnavailableError(
            f"stablekernels backend {name!r} cannot run on device {str(device)!r}: {support.reason}"
        )
    return backend


def automatic_backend(device: torch.device) -> str:
    """The first backend of the automatic order that can serve ``device`` (always one)."""
    name = _AUTOMATIC.get(device.type)
    if name is None:
        name = next(
            (
                n
                for n in AUTO_ORDER.get(device.type, _AUTO_ORDER_OTHER)
                if BACKENDS[n].supports(device.type)
            ),
            "torch",
        )
        _AUTOMATIC[device.type] = name
    return name


# What a backend serves is fixed at import (the module doc), so the answers are kept:
# (backend name, device type) -> Backend for the pairs found served; device type -> the
# automatic choice.
_SERVES: dict[tuple[str, str], Backend] = {}
_AUTOMATIC: dict[str, str] = {}


def local_device_types() -> list[str]:
    """Device types this machine has: cpu, and cuda where a GPU is visible."""
    return ["cpu", "cuda"] if _CUDA_PRESENT else ["cpu"]


def available_backends() -> list[str]:
    """Names of the backends that can run on at least one device of this machine."""
    return [
        name
        for name, backend in BACKENDS.items()
        if any(backend.supports(t) for t in local_device_types())
    ]


ENV_VAR = "STABLEKERNELS_BACKEND"
# Read once, at import: torch.compile does not guard on os.environ, so a value read per call
# could silently go stale inside a compiled graph.
ENV_BACKEND: str | None = os.environ.get(ENV_VAR) or None
