"""The textbook formulas fail where the seed tutorials say they fail, and stablekernels
does not."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import stablekernels as sk


def test_naive_softmax_of_1000_and_0_is_nan_and_0(backend):
    x = torch.tensor([1000.0, 0.0])
    naive = sk.naive.softmax(x)
    assert math.isnan(naive[0].item()) and naive[1].item() == 0.0
    assert sk.softmax(x, backend=backend).tolist() == [1.0, 0.0]


def test_naive_softmax_of_1000_1000_is_nan(backend):
    x = torch.tensor([1000.0, 1000.0])
    assert sk.naive.softmax(x).isnan().all()
    assert sk.softmax(x, backend=backend).tolist() == [0.5, 0.5]


def test_naive_logsumexp_of_1000_1000_is_inf(backend):
    x = torch.tensor([1000.0, 1000.0])
    assert sk.naive.logsumexp(x).item() == math.inf
    assert sk.logsumexp(x, backend=backend).item() == pytest.approx(1000 + math.log(2))


def test_naive_softmax_underflows_to_nan(backend):
    x = torch.tensor([-1000.0, -1000.0])
    assert sk.naive.softmax(x).isnan().all()
    assert sk.softmax(x, backend=backend).tolist() == [0.5, 0.5]


def test_naive_log_softmax_rounds_small_log_probabilities_to_zero(backend):
    x = torch.tensor([0.0, -20.0])
    assert sk.naive.log_softmax(x)[0].item() == 0.0
    assert sk.log_softmax(x, backend=backend)[0].item() == pytest.approx(-2.0611536e-09, rel=1e-5)


def test_naive_agrees_where_it_is_safe():
    x = torch.randn(4, 50, dtype=torch.float64)
    torch.testing.assert_close(sk.naive.softmax(x, 1), torch.softmax(x, 1))
    torch.testing.assert_close(sk.naive.log_softmax(x, 1), torch.log_softmax(x, 1))
    torch.testing.assert_close(sk.naive.logsumexp(x, 1, True), torch.logsumexp(x, 1, True))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_seed_float32_underflow_and_overflow():
    # Seed examples 1-3: 1e-50 is stored as 0 and 1e39 as inf in float32, so x * y / y is
    # NaN either way; the limits of float32 are 1.4e-45 and 3.4e38.
    x = np.float32(1)
    assert np.isnan(x * np.float32(1e-50) / np.float32(1e-50))
    assert np.isnan(x * np.float32(1e39) / np.float32(1e39))
    assert np.nextafter(np.float32(0), np.float32(1)) == pytest.approx(1.4013e-45, rel=1e-4)
    assert np.finfo(np.float32).max == pytest.approx(3.40282e38, rel=1e-5)
    one = torch.tensor(1.0)
    assert (one * torch.tensor(1e-50) / torch.tensor(1e-50)).isnan()
    assert (one * torch.tensor(1e39) / torch.tensor(1e39)).isnan()
