"""Shared fixtures and measuring helpers.

Every kernel test takes the ``backend`` fixture, which runs it once per backend that can
serve CPU tensors on this machine: ``torch`` always, ``cpp`` once the extension is built,
``triton`` under ``TRITON_INTERPRET=1``. A new backend is held to the same suite by being
registered, with no new test code.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

# Without a GPU, the Triton kernels run under Triton's interpreter on CPU tensors. The
# variable must be set before triton is imported, and before stablekernels reads it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import stablekernels as sk  # noqa: E402
from stablekernels import backends  # noqa: E402

settings.register_profile("default", deadline=None, max_examples=60, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# Subprocesses and worker processes of the tests do seconds to minutes of work alone. This limit
# only ends a hang: generous for a machine loaded many times over (no test asserts a time).
SUBPROCESS_TIMEOUT_S = 1800

CPU_BACKENDS = [b for b in sk.available_backends() if backends.BACKENDS[b].supports("cpu")]
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@pytest.fixture(params=CPU_BACKENDS)
def backend(request) -> str:
    return request.param


def _mentions_bfloat16(value) -> bool:
    if isinstance(value, (tuple, list)):
        return any(_mentions_bfloat16(v) for v in value)
    return value is torch.bfloat16


@pytest.fixture(autouse=True)
def _skip_bfloat16_under_the_triton_interpreter(request):
    """The Triton interpreter computes through numpy, which has no bfloat16: bf16 cases of
    the triton backend run on a GPU only."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is None or callspec.params.get("backend") != "triton":
        return
    if backends.TRITON_INTERPRETER and any(_mentions_bfloat16(v) for v in callspec.params.values()):
        pytest.skip("bfloat16 under the Triton interpreter: numpy has no bfloat16 (runs on GPU)")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def poison_compare(a: torch.Tensor, b: torch.Tensor) -> None:
    """Same shape, dtype, and values, NaN where the other has NaN."""
    assert a.shape == b.shape, (a.shape, b.shape)
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    torch.testing.assert_close(a, b, equal_nan=True, rtol=0, atol=0)


# Error metrics against a float64 reference. softmax and log_softmax: relative error (their
# selling point is relative accuracy, down to tiny probabilities and log-probabilities near
# 0), with the smallest normal of the output dtype as floor. logsumexp: absolute error in
# units of max(|lse|, 1), since an lse near 0 comes from cancellation of max and log-sum.


def rel_error(actual: torch.Tensor, ref: torch.Tensor, cond: torch.Tensor | None = None) -> float:
    """Max relative error; with ``cond``, each element's error is divided by (1 + cond).

    For softmax pass ``cond = |x - max(x)|``: exp(t) magnifies the rounding of its argument
    t = x - max by |t| (in every implementation, torch's included), so an outright bound in
    units of eps must grow with it.
    """
    floor = torch.finfo(actual.dtype).tiny
    err = (actual.double() - ref).abs() / (ref.abs() + floor)
    if cond is not None:
        err = err / (1 + cond)
    return err.max().item()


def softmax_condition(x: torch.Tensor, dim: int) -> torch.Tensor:
    """|x - max(x)| along ``dim``, in float64 (see :func:`rel_error`)."""
    x64 = x.double()
    if x64.dim() == 0:
        return torch.zeros_like(x64)
    return (x64 - x64.amax(dim, keepdim=True)).abs()


def lse_error(actual: torch.Tensor, ref: torch.Tensor) -> float:
    return ((actual.double() - ref).abs() / ref.abs().clamp(min=1.0)).max().item()


def scaled_error(actual: torch.Tensor, ref: torch.Tensor) -> float:
    """Max absolute error over max |ref| (for gradients, which cross zero)."""
    scale = ref.abs().max().clamp(min=torch.finfo(actual.dtype).tiny)
    return ((actual.double() - ref).abs().max() / scale).item()
