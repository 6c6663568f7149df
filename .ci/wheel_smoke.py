"""Smoke test of an installed wheel (run from outside the source tree), through the public
API only: the cpp backend is available (its compiled extension imports), and every op runs
with backend="cpp", forward and backward, matching the torch backend."""

import os

import torch

import stablekernels

here = os.path.dirname(stablekernels.__file__)
assert "site-packages" in here, f"not the installed package: {here}"
assert "cpp" in stablekernels.available_backends(), stablekernels.backends.BACKENDS["cpp"].status()

x = torch.randn(8, 1000, dtype=torch.float32) * 5
for name in ("softmax", "log_softmax", "logsumexp"):
    fn = getattr(stablekernels, name)
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    ours, ref = fn(a, -1, backend="cpp"), fn(b, -1, backend="torch")
    torch.testing.assert_close(ours, ref)
    ours.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(a.grad, b.grad)
    print(f"{name}: ok")
target = torch.randint(0, 1000, (8,))
a = x.clone().requires_grad_()
b = x.clone().requires_grad_()
ours = stablekernels.cross_entropy(a, target, label_smoothing=0.1, backend="cpp")
ref = torch.nn.functional.cross_entropy(b, target, label_smoothing=0.1)
torch.testing.assert_close(ours, ref)
ours.backward()
ref.backward()
torch.testing.assert_close(a.grad, b.grad)
print("cross_entropy: ok")
print("capability:", torch.ops.stablekernels._fused_cpu_capability())
print("installed at", here)
