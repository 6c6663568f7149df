"""The C++ CPU kernels are compiled once per CPU capability (DEFAULT, AVX2, AVX512) and the
one matching ATen's capability runs. The main suite exercises this machine's best one; here
each capability the machine can run is forced with ATEN_CPU_CAPABILITY in a subprocess and
checked against the torch backend, so the narrower builds cannot rot unseen."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import stablekernels as sk

from .conftest import SUBPROCESS_TIMEOUT_S

pytestmark = pytest.mark.skipif(
    "cpp" not in sk.available_backends(), reason="the compiled extension is not built"
)

ORDER = ["default", "avx2", "avx512"]
BEST = torch.backends.cpu.get_cpu_capability().lower()
RUNNABLE = ORDER[: ORDER.index(BEST) + 1] if BEST in ORDER else ["default"]

CHECK = r"""
import torch, stablekernels as sk
print(torch.ops.stablekernels._fused_cpu_capability())
torch.manual_seed(0)
cases = [((5, 1023), -1), ((2, 70000), -1), ((1, 300000), -1), ((3, 5, 33), 1), ((4, 7), 0),
         ((64, 300), -1)]
for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
    tol = {torch.float32: 2e-6, torch.float64: 1e-13}.get(dtype, 1e-2)
    for shape, dim in cases:
        x = (torch.randn(shape, dtype=torch.float64) * 4).to(dtype)
        x[..., 0] = float("-inf")
        for name in ("softmax", "log_softmax", "logsumexp"):
            a = x.clone().requires_grad_()
            b = x.clone().requires_grad_()
            ours = getattr(sk, name)(a, dim, backend="cpp")
            ref = getattr(sk, name)(b, dim, backend="torch")
            torch.testing.assert_close(ours, ref, rtol=tol, atol=tol, equal_nan=True, msg=name)
            dy = torch.randn_like(ref)
            ours.backward(dy)
            ref.backward(dy)
            scale = b.grad.double().nan_to_num().abs().max().item()
            torch.testing.assert_close(a.grad, b.grad, rtol=tol, atol=tol * scale,
                                       equal_nan=True, msg=name + " grad")
print("ok")
"""


def _run_on_capability(script: str, capability: str) -> None:
    """Runs ``script`` in a fresh process (from the repository root) on the extension's
    ``capability`` build; the script prints the capability it ran on, then "ok"."""
    run = subprocess.run(
        [sys.executable, "-c", script],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        env=dict(os.environ, ATEN_CPU_CAPABILITY=capability),
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    used, verdict = run.stdout.split()
    assert used == capability.upper() and verdict == "ok"


@pytest.mark.parametrize("capability", RUNNABLE)
def test_each_capability_build_matches_the_torch_backend(capability):
    _run_on_capability(CHECK, capability)


# One thread, each capability: a long float64 row is one task of many blocks (300000
# columns: 4687 blocks of 16 AVX2 vectors), the case where a plain running total of the
# blocks' sums loses to torch's cascade sums. The backward's error stays within the test
# suite's bound against torch (tests/test_autograd.py), whatever the block count.
LONG_ROWS = r"""
import torch, stablekernels as sk
from tests import reference
torch.set_num_threads(1)
print(torch.ops.stablekernels._fused_cpu_capability())
torch.manual_seed(0)
def err(a, ref):
    return ((a - ref).abs().max() / ref.abs().max()).item()
def grad(fn, x, dy):
    x = x.clone().requires_grad_()
    fn(x).backward(dy)
    return x.grad
for n in (300000, 1000000):
    x = torch.randn(1, n, dtype=torch.float64) * 3
    dy = torch.randn(1, n, dtype=torch.float64)
    for name in ("softmax", "log_softmax"):
        ours = grad(lambda t: getattr(sk, name)(t, 1, backend="cpp"), x, dy)
        theirs = grad(lambda t: getattr(torch, name)(t, 1), x, dy)
        ref = reference.backward(name, x, dy, 1)
        e_ours, e_theirs = err(ours, ref), err(theirs, ref)
        assert e_ours <= 2 * e_theirs + 4 * 2.0**-52, (name, n, e_ours, e_theirs)
print("ok")
"""


@pytest.mark.parametrize("capability", RUNNABLE)
def test_long_float64_rows_on_one_thread_as_accurate_as_torch(capability):
    _run_on_capability(LONG_ROWS, capability)


# Outputs larger than the last-level cache are written with streaming (non-temporal) stores;
# STABLEKERNELS_STREAMING_MIN_BYTES=0 streams every output. The values must not change: rows
# of odd lengths put row starts at every alignment, and bf16/fp16 outputs stream pairs of
# converted vectors.
STREAM_SHAPES = [((3, 1000), -1), ((5, 17), -1), ((2, 40001), -1), ((7, 130), -1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,dim", STREAM_SHAPES)
def test_streamed_outputs_are_bitwise_the_cached_ones(monkeypatch, dtype, shape, dim):
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 4).to(dtype)
    x[0, 3] = float("-inf")
    target = torch.randint(0, shape[-1], shape[:-1], generator=gen)
    weight_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    weight = torch.rand(shape[-1], generator=gen, dtype=torch.float64).to(weight_dtype)

    def run():
        results = []
        for name in ("softmax", "log_softmax"):
            a = x.clone().requires_grad_()
            y = getattr(sk, name)(a, dim, backend="cpp")
            (g,) = torch.autograd.grad(y, a, torch.ones_like(y).div_(3))
            results += [y, g]
        for out_dtype in (torch.float32, torch.float64):  # y of another dtype than x
            results.append(sk.softmax(x, dim, dtype=out_dtype, backend="cpp"))
        a = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(sk.logsumexp(a, dim, backend="cpp").sum(), a)
        results.append(g)
        if dtype != torch.float16:
            a = x.clone().requires_grad_()
            loss = sk.cross_entropy(a, target, weight=weight, label_smoothing=0.1, backend="cpp")
            results.append(torch.autograd.grad(loss, a)[0])
        return results

    monkeypatch.delenv("STABLEKERNELS_STREAMING_MIN_BYTES", raising=False)
    cached = run()
    monkeypatch.setenv("STABLEKERNELS_STREAMING_MIN_BYTES", "0")
    streamed = run()
    for c, s in zip(cached, streamed, strict=True):
        assert torch.equal(c.isnan(), s.isnan())
        assert torch.equal(c.nan_to_num(0.0), s.nan_to_num(0.0))
