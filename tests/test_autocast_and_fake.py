"""Autocast (torch's dtype policy, CPU and CUDA) and shape-only tensors (meta, FakeTensorMode)
for every op and option. CUDA's autocast policy is checked at dispatch level on fake CUDA
tensors, which need no GPU: the autocast kernels run, the fake kernels give the dtypes."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import stablekernels as sk

HALVES_AND_FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _calls(x, target, probabilities, weight, backend=None):
    """(ours, torch's) pairs: every op, and cross_entropy with each option."""
    b = {"backend": backend} if backend else {}
    return [
        (lambda: sk.softmax(x, -1, **b), lambda: torch.softmax(x, -1)),
        (
            lambda: sk.softmax(x, 0, dtype=torch.float16, **b),
            lambda: torch.softmax(x, 0, dtype=torch.float16),
        ),
        (lambda: sk.log_softmax(x, 0, **b), lambda: torch.log_softmax(x, 0)),
        (lambda: sk.logsumexp(x, -1, **b), lambda: torch.logsumexp(x, -1)),
        (lambda: sk.logsumexp(x, (0, 1), True, **b), lambda: torch.logsumexp(x, (0, 1), True)),
        (lambda: sk.cross_entropy(x, target, **b), lambda: F.cross_entropy(x, target)),
        (
            lambda: sk.cross_entropy(x, target, weight, label_smoothing=0.1, ignore_index=1, **b),
            lambda: F.cross_entropy(x, target, weight, label_smoothing=0.1, ignore_index=1),
        ),
        (
            lambda: sk.cross_entropy(x, target, reduction="none", z_loss=1e-3, **b),
            lambda: F.cross_entropy(x, target, reduction="none"),
        ),
        (
            lambda: sk.cross_entropy(x, probabilities, **b),
            lambda: F.cross_entropy(x, probabilities),
        ),
    ]


@contextlib.contextmanager
def _autocast(device_type: str, dtype: torch.dtype):
    # The low-level switch: torch.autocast("cuda") disables itself on a machine without CUDA.
    enabled = torch.is_autocast_enabled(device_type)
    previous = torch.get_autocast_dtype(device_type)
    torch.set_autocast_enabled(device_type, True)
    torch.set_autocast_dtype(device_type, dtype)
    try:
        yield
    finally:
        torch.set_autocast_enabled(device_type, enabled)
        torch.set_autocast_dtype(device_type, previous)


def _tensors(device, dtype):
    x = torch.randn(4, 6, device=device).to(dtype)
    target = torch.tensor([0, 1, 5, 2], device=device)
    probabilities = torch.softmax(torch.randn(4, 6, device=device), -1).to(dtype)
    weight = torch.rand(6, device=device).to(dtype)
    return x, target, probabilities, weight


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dtype", HALVES_AND_FLOATS)
def test_cpu_autocast_gives_torch_dtypes_and_values(backend, dtype, autocast_dtype):
    tensors = _tensors("cpu", dtype)
    with torch.autocast("cpu", dtype=autocast_dtype):
        for ours, theirs in _calls(*tensors, backend=backend):
            a, b = ours(), theirs()
            assert a.dtype == b.dtype
            if backend != "triton" or dtype != torch.bfloat16:
                torch.testing.assert_close(a.double(), b.double(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dtype", HALVES_AND_FLOATS)
def test_cuda_autocast_policy_at_dispatch_level(dtype, autocast_dtype):
    with FakeTensorMode(), _autocast("cuda", autocast_dtype):
        tensors = _tensors("cuda", dtype)
        for ours, theirs in _calls(*tensors):
            a, b = ours(), theirs()
            assert (a.dtype, a.shape) == (b.dtype, b.shape)


def test_cuda_autocast_kernels_are_registered():
    for name in ("softmax", "log_softmax", "logsumexp"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(
            f"stablekernels::{name}", "AutocastCUDA"
        )


@pytest.mark.parametrize("dtype", HALVES_AND_FLOATS)
def test_meta_tensors(dtype):
    for ours, theirs in _calls(*_tensors("meta", dtype)):
        a, b = ours(), theirs()
        assert a.device.type == "meta"
        assert (a.dtype, a.shape) == (b.dtype, b.shape)


@pytest.mark.parametrize("dtype", HALVES_AND_FLOATS)
def test_fake_tensors(backend, dtype):
    with FakeTensorMode():
        for ours, theirs in _calls(*_tensors("cpu", dtype), backend=backend):
            a, b = ours(), theirs()
            assert (a.dtype, a.shape) == (b.dtype, b.shape)
        x = torch.randn(2, 6, 3, requires_grad=True)
        t = torch.zeros(2, 3, dtype=torch.long)
        loss = sk.cross_entropy(x, t, label_smoothing=0.1, backend=backend)
        loss.backward()
        assert x.grad.shape == x.shape
