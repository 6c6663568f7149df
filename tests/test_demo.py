"""``python -m stablekernels``: the values the demo shows are what it claims (the naive
formula fails on every classic case, stablekernels is right on each), its float32 limits are
float32's, its timing rows measure every provider, and the command exits 0."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import stablekernels as sk
from stablekernels import __main__ as demo

CASES = {c.case: c for c in demo.failure_cases()}


def _within_rounding(value: torch.Tensor, exact: torch.Tensor) -> bool:
    """Finite and within one unit of ``value``'s dtype (relative) of ``exact``."""
    v = value.double()
    tol = torch.finfo(value.dtype).eps * exact.abs()
    return bool(torch.isfinite(v).all() and ((v - exact).abs() <= tol).all())


@pytest.mark.parametrize("name", list(CASES))
def test_stablekernels_is_right_and_naive_is_wrong_on_every_case(name):
    case = CASES[name]
    assert case.stablekernels.dtype == case.naive.dtype, name
    assert case.stablekernels.shape == case.exact.shape, name
    assert _within_rounding(case.stablekernels, case.exact), (case.stablekernels, case.exact)
    assert not _within_rounding(case.naive, case.exact), (case.naive, case.exact)


def test_the_naive_failures_are_the_ones_described():
    big = CASES["softmax([1000, 0])"].naive
    assert math.isnan(big[0]) and big[1] == 0
    assert CASES["softmax([1000, 1000])"].naive.isnan().all()
    assert CASES["softmax([-1000, -1000])"].naive.isnan().all()
    assert CASES["logsumexp([1000, 1000])"].naive.item() == math.inf
    assert CASES["log_softmax([0, -20])[0]"].naive.item() == 0.0
    half = CASES["logsumexp(70000 fp16 zeros)"]
    assert half.naive.dtype == torch.float16 and half.naive.item() == math.inf


def test_the_exact_column_is_exact():
    assert CASES["logsumexp(70000 fp16 zeros)"].exact.item() == pytest.approx(11.156251, rel=1e-7)
    assert CASES["log_softmax([0, -20])[0]"].exact.item() == pytest.approx(
        -2.0611536224385579e-09, rel=1e-12
    )
    assert CASES["logsumexp([1000, 1000])"].exact.item() == pytest.approx(1000.6931471805599)


def test_float32_limits():
    lim = demo.float32_limits()
    assert lim.small_stored == 0.0 and math.isnan(lim.small_ratio)
    assert lim.large_stored == math.inf and math.isnan(lim.large_ratio)
    assert lim.smallest == 2.0**-149  # the smallest float32 subnormal, 1.4e-45
    assert lim.largest == (2 - 2.0**-23) * 2.0**127  # 3.4e38
    assert lim.exp_1000 == math.inf and lim.exp_minus_1000 == 0.0


def test_backend_rows_list_every_backend_and_which_are_available():
    rows = demo.backend_rows()
    assert [r.name for r in rows] == list(sk.backends.BACKENDS)
    assert [r.name for r in rows if r.available] == sk.available_backends()


def test_timing_rows_measure_every_provider_on_every_shape():
    shapes = [(8, 8), (4, 64)]
    rows = demo.timing_rows(torch.device("cpu"), shapes, repeats=3)
    providers = [label for label, _ in demo.timing_providers(torch.device("cpu"))]
    assert {"stablekernels (torch)", "torch.softmax", "naive"} <= set(providers)
    assert [(r.shape, r.provider) for r in rows] == [(s, p) for s in shapes for p in providers]
    for r in rows:
        assert r.median_s > 0
        assert r.gbs == pytest.approx(2 * r.shape[0] * r.shape[1] * 4 / r.median_s / 1e9)


def test_demo_command_exits_0():
    # As a user runs it: without the Triton interpreter the tests turn on (under which the
    # timing table's larger shapes take minutes).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-m", "stablekernels", "--repeats", "3"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
