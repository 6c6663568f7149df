"""The argument checks of the ops, in one place: shared by the routers, the fake kernels and
the public functions (each op module adds the checks of its own arguments)."""

from __future__ import annotations

import torch

from .. import backends

FLOATING_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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


# (backend, device type) -> Kernels, for the pairs that were served once: what a backend
# can serve is fixed at import (stablekernels.backends), so the check is made once per pair.
_SERVED: dict[tuple[str, str], backends.Kernels] = {}


def _kernels(op: str, backend: str, *tensors: torch.Tensor) -> backends.Kernels:
    if len(tensors) > 1:
        check_same_device(op, *tensors)
    key = (backend, tensors[0].device.type)
    kernels = _SERVED.get(key)
    if kernels is None:
        kernels = _SERVED[key] = backends.check_serves(backend, tensors[0].device).kernels()
    return kernels


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


def _per_row(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A per-row tensor (a reduced shape, with or without keepdim) as a flat contiguous
    vector of ``dtype`` in row order (o * inner + i): the order of a reduced shape's
    elements."""
    return t.to(dtype).contiguous().reshape(-1)


REDUCTIONS = ("mean", "sum", "none")


def check_reduction(op: str, reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}(): {reduction} is not a valid value for reduction")
