"""Launches per call: each direction of an op is one extension kernel call, with no tensor
op around it that runs over data (counted with torch.profiler by benchmarks/overhead.py, as
its benchmark reports them). The masked ops' variants (log_softmax, logsumexp,
masked_rows="nan", an additive mask, causal) are listed below; the masked logsumexp's
backward, which recomputes the probabilities with the forward kernel and multiplies them by
the gradient, is not yet one kernel and is not listed."""

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
    ("masked_softmax", "forward+backward", 2),
    ("softmax", "forward+backward", 2),
    ("log_softmax", "forward+backward", 2),
    ("logsumexp", "forward+backward", 2),
    ("cross_entropy", "forward", 1),
    ("cross_entropy", "forward+backward", 2),
    ("cross_entropy+options", "forward", 1),
    ("cross_entropy+options", "forward+backward", 2),
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


def _masked_variants():
    """name -> (function of x, directions): the masked ops' options on (4, 2, 16, 64) scores,
    with a key-padding mask that leaves dead rows."""
    import stablekernels as sk

    keep = torch.rand(4, 1, 1, 64, generator=torch.Generator().manual_seed(0)) > 0.3
    keep[1] = False  # dead rows
    bias = torch.randn(1, 2, 1, 64, generator=torch.Generator().manual_seed(1))
    both = ("forward", "forward+backward")
    return {
        "softmax": (lambda x: sk.softmax(x, scale=0.125, mask=keep, backend="cpp"), both),
        "log_softmax": (lambda x: sk.log_softmax(x, scale=0.125, mask=keep, backend="cpp"), both),
        "logsumexp": (lambda x: sk.logsumexp(x, -1, scale=0.125, mask=keep, backend="cpp"),
                      ("forward",)),
        "softmax nan": (lambda x: sk.softmax(x, mask=keep, masked_rows="nan", backend="cpp"),
                        both),
        "log_softmax nan": (
            lambda x: sk.log_softmax(x, mask=keep, masked_rows="nan", backend="cpp"), both),
        "logsumexp nan": (
            lambda x: sk.logsumexp(x, -1, mask=keep, masked_rows="nan", backend="cpp"),
            ("forward",)),
        "softmax additive": (lambda x: sk.softmax(x, mask=bias, backend="cpp"), both),
        "log_softmax additive": (lambda x: sk.log_softmax(x, mask=bias, backend="cpp"), both),
        "softmax causal": (lambda x: sk.softmax(x, causal=True, backend="cpp"), both),
        "log_softmax causal": (
            lambda x: sk.log_softmax(x, scale=0.5, causal=True, causal_offset=3, backend="cpp"),
            both),
    }  # fmt: skip


@pytest.mark.parametrize(
    ("variant", "direction"),
    [(v, d) for v, (_, directions) in _masked_variants().items() for d in directions],
)
def test_masked_variants_are_one_kernel_call_each_way(variant, direction):
    """The forward kernel fills dead rows itself (no read-back, no masked_fill) and returns
    the logsumexp in x's dtype; the backward kernel scales and zeroes (dead rows, dropped
    log_softmax elements) itself: one call each way, no sync."""
    fn, _ = _masked_variants()[variant]
    x = torch.randn(4, 2, 16, 64)
    call = overhead.make_call(lambda x, t: fn(x), variant, direction, x, None)
    call()
    row = overhead.Row(variant, direction, "4x2x16x64", "sk-cpp")
    overhead.count_ops(call, row)
    kernels = 1 if direction == "forward" else 2
    assert (row.sk_kernels, row.launches, row.syncs) == (kernels, kernels, 0), row.leaf_ops


CROSS_ENTROPY_OPTIONS = {
    "weight": {"weight": torch.rand(1000)},
    "ignore_index": {"ignore_index": 7},
    "smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-3},
    "everything": {"weight": torch.rand(1000), "label_smoothing": 0.1, "z_loss": 1e-3},
}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", list(CROSS_ENTROPY_OPTIONS))
@pytest.mark.parametrize("return_lse", [False, True])
def test_cross_entropy_is_one_kernel_call_each_way_with_every_option(
    reduction, options, return_lse
):
    """Every option and reduction of class-target cross-entropy: the forward is one kernel
    call (the reduction inside it), the backward one more, with no tensor op over data around
    them (fp32 logits: the loss needs no conversion; return_lse converts the fp64 lse to the
    fp32 it returns, one op, only when asked)."""
    import stablekernels as sk

    x = torch.randn(64, 1000)
    t = torch.randint(0, 1000, (64,))
    t[::5] = 7  # some rows ignored when ignore_index is 7
    kwargs = {**CROSS_ENTROPY_OPTIONS[options], "reduction": reduction, "return_lse": return_lse}
    leaf = x.clone().requires_grad_()
    grad = torch.ones(64) if reduction == "none" else torch.ones(())

    def forward_backward():
        out = sk.cross_entropy(leaf, t, backend="cpp", **kwargs)
        (out[0] if return_lse else out).backward(grad)
        leaf.grad = None

    def forward():
        with torch.no_grad():
            sk.cross_entropy(x, t, backend="cpp", **kwargs)

    extra = 1 if return_lse else 0  # the lse's conversion to fp32
    for call, kernels in ((forward, 1), (forward_backward, 2)):
        call()
        row = overhead.Row("cross_entropy", "-", "64x1000", "sk-cpp")
        overhead.count_ops(call, row)
        assert (row.sk_kernels, row.launches, row.syncs) == (kernels, kernels + extra, 0), (
            row.leaf_ops
        )


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
