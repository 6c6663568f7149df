"""stablekernels._timing: the interleaved timer the benchmark suite compares providers with."""

from __future__ import annotations

import time

import pytest

from stablekernels import _timing


def test_interleaved_rounds_time_each_callable_once_in_turn():
    order = []

    def make(name, seconds):
        def call():
            order.append(name)
            time.sleep(seconds)

        return call

    timings = _timing.measure_interleaved([make("a", 0.002), make("b", 0.006)], warmup=1, repeats=5)
    # One warm-up call of each, then five rounds of a, b.
    assert order == ["a", "b"] + ["a", "b"] * 5
    assert [t.samples for t in timings] == [5, 5]
    assert timings[0].median == pytest.approx(0.002, abs=0.0015)
    assert timings[1].median == pytest.approx(0.006, abs=0.003)
    assert timings[0].p20 <= timings[0].median <= timings[0].p80


def test_a_callable_that_raises_is_reported_and_the_others_go_on():
    calls = {"ok": 0}

    def ok():
        calls["ok"] += 1

    def broken():
        raise ValueError("no kernel for this shape")

    good, bad = _timing.measure_interleaved([ok, broken], warmup=2, repeats=4)
    assert isinstance(bad, ValueError) and "no kernel" in str(bad)
    assert good.samples == 4 and calls["ok"] == 6


def test_the_time_limit_stops_slow_rounds_after_three():
    timings = _timing.measure_interleaved(
        [lambda: time.sleep(0.02)], warmup=0, repeats=1000, max_seconds=0.01
    )
    assert timings[0].samples == 3


def test_measure_is_one_callable_of_the_interleaved_timer():
    calls = []
    timing = _timing.measure(lambda: calls.append(1), warmup=2, repeats=7)
    assert timing.samples == 7 and len(calls) == 9

    def broken():
        raise RuntimeError("kernel failed")

    with pytest.raises(RuntimeError, match="kernel failed"):
        _timing.measure(broken)
