"""The textbook formulas of stablekernels.naive fail where the seed tutorials say they fail
(NaN, inf, a log-probability rounded to 0), agree with torch where they are safe, and
stablekernels' ops do not fail on the same inputs."""

from __future__ import annotations

import math

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
