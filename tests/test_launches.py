"""Launches per call: each direction of an op is one extension kernel call, with no tensor
op around it that runs over data (counted with torch.profiler by benchmarks/overhead.py, as
its benchmark reports them). The ops still short of it (cross-entropy, logsumexp's and the
masked softmax's backward) are not listed here yet."""

from __future__ import annotations

import pytest
import torch

from benchmarks import overhead

from .conftest import CPU_BACKENDS

pytestmark = pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="the extension is not built")

ONE_KERNEL = [
    ("softmax", "forward", 1),
    ("log_softmax", "forward", 1),
    ("logsumexp", "forward", 1),
    ("masked_softmax", "forward", 1),
    ("softmax", "forward+backward", 2),
    ("log_softmax", "forward+backward", 2),
]


@pytest.mark.parametrize(("op", "direction", "kernels"), ONE_KERNEL)
def test_each_direction_is_one_kernel_call(op, direction, kernels):
    x, t = torch.randn(64, 1000), torch.randint(0, 1000, (64,))
    call = overhead.make_call(
        overhead.make_function("sk-cpp", op, (64, 1000), "cpu"), op, direction, x, t
    )
    call()
    row = overhead.Row(op, direction, "64x1000", "sk-cpp")
    overhead.count_ops(call, row)
    assert (row.sk_kernels, row.launches, row.syncs) == (kernels, kernels, 0), row.leaf_ops


def test_the_count_sees_torch_launches():
    """The counter is not blind: torch's own logsumexp is a composite of several kernels,
    and an extra tensor op around a kernel is counted."""
    x, t = torch.randn(64, 1000), torch.randint(0, 1000, (64,))
    row = overhead.Row("logsumexp", "forward", "64x1000", "torch")
    overhead.count_ops(overhead.make_call(overhead.make_function(
        "torch", "logsumexp", (64, 1000), "cpu"), "logsumexp", "forward", x, t), row)  # fmt: skip
    assert row.launches >= 4 and row.sk_kernels == 0, row.leaf_ops

    import stablekernels as sk

    def softmax_then_scale():
        with torch.no_grad():
            return sk.softmax(x, -1, backend="cpp") * 2

    row = overhead.Row("softmax", "forward", "64x1000", "sk-cpp")
    overhead.count_ops(softmax_then_scale, row)
    assert (row.sk_kernels, row.launches) == (1, 2), row.leaf_ops
