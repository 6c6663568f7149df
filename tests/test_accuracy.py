"""Forward values: agreement with torch, and accuracy against a float64 reference.

The bound of the numerics contract: our error against float64 is no worse than twice
torch's own error on the same input plus a few units of roundoff, and is a few units of
roundoff outright (where torch's half-precision CPU kernels overflow, the first bound alone
would say nothing).
"""

from __future__ import annotations

import math

import pytest
import torch

import stablekernels as sk

from . import reference
from .conftest import FLOAT_DTYPES, eps, lse_error, rel_error, softmax_condition

# (shape, dim): 1-D, ragged N around powers of two, more than 64k columns (several chunks
# of the CPU kernels; one row split across threads), 3-D along every dim.
SHAPES = [
    ((1,), 0),
    ((7,), -1),
    ((5, 1023), -1),
    ((3, 1025), 1),
    ((2, 4097), -1),
    ((2, 70000), -1),
    ((1, 300000), -1),  # one long row: split across threads, merged
    ((3, 5, 33), 0),
    ((3, 5, 33), 1),
    ((3, 5, 33), 2),
    ((300, 2), -1),
]
OFFSETS = [0.0, 1e4, -1e4, 1e6]
# Outright bound, in units of the output dtype's eps.
CAP = {torch.float64: 8, torch.float32: 8, torch.float16: 2, torch.bfloat16: 2}


def make_input(shape, dtype, offset, scale=3.0) -> torch.Tensor:
    return (torch.randn(shape, dtype=torch.float64) * scale + offset).to(dtype)


def offsets_for(dtype):
    # fp16 tops out at 65504, so 1e6 is not a float16 input.
    return [o for o in OFFSETS if abs(o) < torch.finfo(dtype).max]


CASES = [
    (shape, dim, dtype, offset)
    for dtype in FLOAT_DTYPES
    for offset in offsets_for(dtype)
    for shape, dim in SHAPES
]


def case_id(case):
    shape, dim, dtype, offset = case
    return f"{'x'.join(map(str, shape))}-d{dim}-{str(dtype)[6:]}-off{offset:g}"


def check_bound(ours: float, theirs: float, dtype: torch.dtype) -> None:
    e = eps(dtype)
    assert ours <= 2 * theirs + 4 * e, f"error {ours:.3g} > 2 x torch's {theirs:.3g} + 4 eps"
    assert ours <= CAP[dtype] * e, f"error {ours:.3g} > {CAP[dtype]} eps ({e:.3g})"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_softmax_and_log_softmax_accuracy(backend, case):
    shape, dim, dtype, offset = case
    x = make_input(shape, dtype, offset)
    for name, cond in (("softmax", softmax_condition(x, dim)), ("log_softmax", None)):
        ours = getattr(sk, name)(x, dim, backend=backend)
        theirs = getattr(torch, name)(x, dim)
        ref = getattr(reference, name)(x, dim)
        assert ours.shape == x.shape and ours.dtype == dtype
        check_bound(rel_error(ours, ref, cond), rel_error(theirs, ref, cond), dtype)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("keepdim", [False, True])
def test_logsumexp_accuracy(backend, case, keepdim):
    shape, dim, dtype, offset = case
    x = make_input(shape, dtype, offset)
    ours = sk.logsumexp(x, dim, keepdim, backend=backend)
    theirs = torch.logsumexp(x, dim, keepdim)
    ref = reference.logsumexp(x, dim, keepdim)
    assert ours.shape == theirs.shape and ours.dtype == dtype
    check_bound(lse_error(ours, ref), lse_error(theirs, ref), dtype)


def test_log_softmax_tiny_log_probability(backend):
    # log_softmax([0, -20])[0] = -log1p(exp(-20)); log(sum(exp)) rounds it to 0.
    out = sk.log_softmax(torch.tensor([0.0, -20.0]), backend=backend)
    exact = -math.log1p(math.exp(-20.0))
    assert out[0].item() == pytest.approx(-2.0611536e-09, rel=1e-5)
    assert out[0].item() == pytest.approx(exact, rel=1e-6)
    assert torch.log_softmax(torch.tensor([0.0, -20.0]), 0)[0].item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_log_softmax_tiny_relative_precision(backend, dtype):
    # Entries near 0 keep relative precision over a range of gaps; the reference is the
    # closed form -log1p(sum_{i != 0} exp(-gap_i)) in float64.
    # Gaps whose result is a normal number of the dtype (fp16's smallest is 6.1e-5).
    gaps = torch.tensor([6.0, 8.0, 12.0, 16.0, 20.0, 30.0, 40.0])
    gaps = gaps[torch.exp(-gaps) > 2 * torch.finfo(dtype).tiny]
    x = torch.stack([torch.zeros_like(gaps), -gaps, -gaps - 1.0], dim=1).to(dtype)
    x64 = x.double()
    exact = -torch.log1p(torch.exp(x64[:, 1]) + torch.exp(x64[:, 2]))
    out = sk.log_softmax(x, backend=backend)[:, 0].double()
    assert ((out - exact).abs() / exact.abs()).max().item() <= 2 * eps(dtype)


def test_logsumexp_fp16_long_row_does_not_overflow(backend):
    x = torch.zeros(70000, dtype=torch.float16)
    out = sk.logsumexp(x, backend=backend)
    assert out.dtype == torch.float16
    assert out.item() == pytest.approx(math.log(70000), rel=eps(torch.float16))
    # torch's CPU float16 kernel accumulates in float16 and overflows here.
    assert torch.logsumexp(x, 0).isinf().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softmax_at_large_offset_is_accurate(backend, dtype):
    # Around 1e6 the lse itself carries an absolute error of about ulp(1e6) = 0.06 in fp32,
    # so exp(x - lse) would be off by percents; dividing by (1 + s') is not.
    x = make_input((4, 1000), dtype, 1e6)
    ours = sk.softmax(x, backend=backend)
    ref = torch.softmax(x.double(), -1)
    cond = softmax_condition(x, -1)
    assert rel_error(ours, ref, cond) <= 8 * eps(dtype)
    lse = torch.logsumexp(x, -1, keepdim=True)
    assert rel_error(torch.exp(x - lse), ref, cond) > 100 * eps(dtype)  # the form we avoid


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@pytest.mark.parametrize(
    "in_dtype,out_dtype",
    [
        (torch.float32, torch.float64),
        (torch.float64, torch.float32),
        (torch.float16, torch.float32),
        (torch.float32, torch.float16),
        (torch.float32, torch.bfloat16),
        (torch.int64, torch.float32),
        (torch.int32, torch.float64),
        (torch.bool, torch.float32),
    ],
)
def test_dtype_argument(backend, name, in_dtype, out_dtype):
    x = (torch.randn(6, 129) * 4).to(in_dtype)
    ours = getattr(sk, name)(x, 1, dtype=out_dtype, backend=backend)
    theirs = getattr(torch, name)(x, 1, dtype=out_dtype)
    assert ours.dtype == out_dtype == theirs.dtype
    # We round once from the input's own precision; torch casts first. Both are within
    # the output dtype's rounding of the float64 value of the input.
    ref = getattr(reference, name)(x, 1)
    cond = softmax_condition(x, 1) if name == "softmax" else None
    assert rel_error(ours, ref, cond) <= 2 * rel_error(theirs, ref, cond) + 4 * eps(out_dtype)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_logsumexp_of_integers_is_default_float(backend, dtype):
    x = torch.randint(0, 2 if dtype == torch.bool else 50, (4, 37)).to(dtype)
    ours = sk.logsumexp(x, 1, backend=backend)
    theirs = torch.logsumexp(x, 1)
    assert ours.dtype == theirs.dtype == torch.get_default_dtype()
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("dims", [(0, 2), (2, 0), (-1, 0), (1,), (0, 1, 2), [1, 2]])
@pytest.mark.parametrize("keepdim", [False, True])
def test_logsumexp_over_several_dims(backend, dims, keepdim):
    x = torch.randn(4, 6, 9) * 5
    ours = sk.logsumexp(x, dims, keepdim, backend=backend)
    theirs = torch.logsumexp(x, dims, keepdim)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs)
    ref = torch.logsumexp(x.double(), dims, keepdim)
    assert lse_error(ours, ref) <= 2 * lse_error(theirs, ref) + 4 * eps(x.dtype)


def _layouts():
    base = torch.randn(8, 40) * 3
    return {
        "transposed": base.t(),
        "strided": base[:, ::3],
        "expanded": base[:1].expand(5, 40),
        "sliced": base[2:6, 5:37],
        "row_slice": base[:, :31],
        "batched_row_slice": torch.randn(3, 4, 40)[:, :, 3:33],
        "channels_last": torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
    }


@pytest.mark.parametrize("layout", list(_layouts()))
@pytest.mark.parametrize("dim", [0, -1])
def test_non_contiguous_inputs(backend, layout, dim):
    x = _layouts()[layout]
    for name in ("softmax", "log_softmax", "logsumexp"):
        ours = getattr(sk, name)(x, dim, backend=backend)
        theirs = getattr(torch, name)(x, dim)
        assert ours.is_contiguous() and theirs.is_contiguous()
        torch.testing.assert_close(ours, theirs)


def test_inputs_are_not_modified(backend):
    x = torch.randn(16, 300)
    before = x.clone()
    sk.softmax(x, backend=backend)
    sk.log_softmax(x, backend=backend)
    sk.logsumexp(x, backend=backend)
    assert torch.equal(x, before)
