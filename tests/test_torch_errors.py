"""Bad arguments raise what torch raises for them (the exception type), naming the public
argument, never an internal op; and class weights of a half type, which torch refuses beside
float32 logits, are accepted and summed in the accumulation dtype (docs/numerics.md)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import stablekernels as sk
from stablekernels import backends

from .conftest import CPU_BACKENDS

LONG = torch.long


def _x():
    return torch.ones(3, 4)


def _t(n=3):
    return torch.zeros(n, dtype=LONG)


# (name, stablekernels call, torch call, words the message must have)
CASES = [
    (
        "cross_entropy of a 0-dim input, 0-dim class target",
        lambda: sk.cross_entropy(torch.tensor(1.0), torch.tensor(0)),
        lambda: F.cross_entropy(torch.tensor(1.0), torch.tensor(0)),
        "class probabilities",
    ),
    (
        "cross_entropy of a 0-dim input, 1-dim target",
        lambda: sk.cross_entropy(torch.tensor(1.0), _t(1)),
        lambda: F.cross_entropy(torch.tensor(1.0), _t(1)),
        "dim",
    ),
    (
        "cross_entropy of int64 logits",
        lambda: sk.cross_entropy(torch.ones(3, 4, dtype=LONG), _t()),
        lambda: F.cross_entropy(torch.ones(3, 4, dtype=LONG), _t()),
        "floating",
    ),
    (
        "cross_entropy, ignore_index a float",
        lambda: sk.cross_entropy(_x(), _t(), ignore_index=1.5),
        lambda: F.cross_entropy(_x(), _t(), ignore_index=1.5),
        "'ignore_index' must be int, not float",
    ),
    (
        "cross_entropy, ignore_index a bool",
        lambda: sk.cross_entropy(_x(), _t(), ignore_index=True),
        lambda: F.cross_entropy(_x(), _t(), ignore_index=True),
        "'ignore_index' must be int, not bool",
    ),
    (
        "cross_entropy, weight a list",
        lambda: sk.cross_entropy(_x(), _t(), weight=[1.0, 2.0, 3.0, 4.0]),
        lambda: F.cross_entropy(_x(), _t(), weight=[1.0, 2.0, 3.0, 4.0]),
        "'weight' must be Tensor, not list",
    ),
    (
        "softmax, dim a bool",
        lambda: sk.softmax(_x(), True),
        lambda: torch.softmax(_x(), True),
        "'dim' must be int, not bool",
    ),
    (
        "log_softmax, dim a bool",
        lambda: sk.log_softmax(_x(), True),
        lambda: torch.log_softmax(_x(), True),
        "'dim' must be int, not bool",
    ),
    (
        "logsumexp, dim a bool",
        lambda: sk.logsumexp(_x(), True),
        lambda: torch.logsumexp(_x(), True),
        "'dim' must be int, not bool",
    ),
    (
        "linear_cross_entropy, target batch mismatch",
        lambda: sk.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), _t(2)),
        lambda: F.cross_entropy(F.linear(torch.randn(3, 4), torch.randn(5, 4)), _t(2)),
        "Expected input batch_size (3) to match target batch_size (2).",
    ),
    (
        "linear_cross_entropy, ignore_index a float",
        lambda: sk.linear_cross_entropy(
            torch.randn(3, 4), torch.randn(5, 4), _t(), ignore_index=1.5
        ),
        lambda: F.cross_entropy(
            F.linear(torch.randn(3, 4), torch.randn(5, 4)), _t(), ignore_index=1.5
        ),
        "'ignore_index' must be int, not float",
    ),
    (
        "linear_cross_entropy, weight a list",
        lambda: sk.linear_cross_entropy(
            torch.randn(3, 4), torch.randn(5, 4), _t(), weight=[1.0] * 5
        ),
        lambda: F.cross_entropy(
            F.linear(torch.randn(3, 4), torch.randn(5, 4)), _t(), weight=[1.0] * 5
        ),
        "'weight' must be Tensor, not list",
    ),
]


@pytest.mark.parametrize(("name", "ours", "theirs", "words"), CASES, ids=[c[0] for c in CASES])
def test_bad_arguments_raise_torch_s_exception_type(name, ours, theirs, words):
    with pytest.raises(Exception) as torch_error:
        theirs()
    with pytest.raises(Exception) as our_error:
        ours()
    assert type(our_error.value) is type(torch_error.value), (our_error.value, torch_error.value)
    message = str(our_error.value)
    assert words in message and "stablekernels::" not in message, message


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("weight_dtype", [torch.float16, torch.bfloat16])
def test_half_class_weights_sum_past_the_half_range(backend, weight_dtype):
    """The mean divides by the counted rows' summed weights: 70000 rows of weights near 1
    pass float16's largest value (65504) and bfloat16's integer precision; the sum is taken
    in the accumulation dtype, so the mean stays the float64 reference's (torch refuses
    half weights beside float32 logits)."""
    if backend == "triton" and backends.TRITON_INTERPRETER:
        pytest.skip("70000 rows are 70000 interpreted programs (minutes); runs on a GPU")
    g = torch.Generator().manual_seed(0)
    rows, classes = 70000, 8
    x = torch.randn(rows, classes, generator=g)
    t = torch.randint(0, classes, (rows,), generator=g)
    w = (torch.rand(classes, generator=g) * 0.5 + 0.75).to(weight_dtype)
    reference = F.cross_entropy(x.double(), t, weight=w.double())
    for reduction in ("mean", "sum"):
        loss = sk.cross_entropy(x, t, weight=w, reduction=reduction, backend=backend)
        want = reference if reduction == "mean" else reference * w.double()[t].sum()
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=0)
    leaf = x.clone().requires_grad_()
    sk.cross_entropy(leaf, t, weight=w, backend=backend).backward()
    xd = x.double().requires_grad_()
    F.cross_entropy(xd, t, weight=w.double()).backward()
    torch.testing.assert_close(leaf.grad.double(), xd.grad, rtol=1e-4, atol=1e-12)
