"""Property tests (hypothesis): the identities every softmax must satisfy, on rows drawn
from wide ranges (up to +-2^100, so the naive formula would overflow)."""

from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

import stablekernels as sk

from .conftest import CPU_BACKENDS, eps

F32 = torch.float32
EPS = eps(F32)

finite_f32 = st.floats(min_value=-(2.0**100), max_value=2.0**100, allow_nan=False, width=32)
rows = st.lists(finite_f32, min_size=1, max_size=300).map(lambda v: torch.tensor(v, dtype=F32))
# Moderate values on a 1/8 grid, so that shifting them by an integer is exact.
grid_rows = st.lists(st.integers(-800, 800), min_size=1, max_size=300).map(
    lambda v: torch.tensor(v, dtype=F32) / 8
)
backend_names = st.sampled_from(CPU_BACKENDS)


@given(rows, backend_names)
def test_softmax_rows_sum_to_one(x, backend):
    y = sk.softmax(x, backend=backend)
    assert (y >= 0).all() and (y <= 1).all()
    total = y.double().sum().item()
    assert abs(total - 1) <= (8 + math.log2(x.numel())) * EPS


@given(grid_rows, st.integers(-1000, 1000), backend_names)
def test_shift_invariance(x, shift, backend):
    shifted = x + shift  # exact: a 1/8 grid below 2^13 shifted by an integer
    a = sk.softmax(x, backend=backend)
    b = sk.softmax(shifted, backend=backend)
    torch.testing.assert_close(a, b, rtol=16 * EPS, atol=1e-30)
    la = sk.logsumexp(x, backend=backend).double()
    lb = sk.logsumexp(shifted, backend=backend).double()
    assert abs((lb - la) - shift) <= 4 * EPS * (abs(la) + abs(lb) + 1)


@given(rows, backend_names)
def test_logsumexp_between_max_and_max_plus_log_n(x, backend):
    lse = sk.logsumexp(x, backend=backend).double().item()
    m = x.max().double().item()
    slack = 2 * EPS * max(abs(m), 1)
    assert m - slack <= lse <= m + math.log(x.numel()) + slack


@given(rows, backend_names)
def test_log_softmax_is_x_minus_logsumexp(x, backend):
    lsm = sk.log_softmax(x, backend=backend).double()
    lse = sk.logsumexp(x, backend=backend).double()
    scale = x.double().abs().max().item() + 1
    assert ((x.double() - lse) - lsm).abs().max().item() <= 4 * EPS * scale
    assert (lsm <= 0).all()


@given(rows, backend_names)
def test_softmax_is_monotone(x, backend):
    y = sk.softmax(x, backend=backend)
    order = torch.argsort(x, stable=True)
    assert (y[order].diff() >= 0).all()
    lsm = sk.log_softmax(x, backend=backend)
    assert (lsm[order].diff() >= 0).all()
