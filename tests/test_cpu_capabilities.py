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


@pytest.mark.parametrize("capability", RUNNABLE)
def test_each_capability_build_matches_the_torch_backend(capability):
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    run = subprocess.run(
        [sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-4000:]
    used, verdict = run.stdout.split()
    assert used == capability.upper() and verdict == "ok"
