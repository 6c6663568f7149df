"""stablekernels._timing: the interleaved timer the benchmark suite compares providers with."""

from __future__ import annotations

import pytest

from stablekernels import _timing


class _FakeClock:
    """Stands in for the time module in _timing: perf_counter() reads a clock that only the
    test's callables advance, so the timer's arithmetic is checked without depending on how
    busy the machine is."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def test_interleaved_rounds_time_each_callable_once_in_turn(monkeypatch):
    clock = _FakeClock()
    monkeypatch.setattr(_timing, "time", clock)
    order = []

    def make(name, seconds):
        def call():
            order.append(name)
            clock.now += seconds

        return call

    timings = _timing.measure_interleaved([make("a", 0.002), make("b", 0.006)], warmup=1, repeats=5)
    # One warm-up call of each, then five rounds of a, b.
    assert order == ["a", "b"] + ["a", "b"] * 5
    assert [t.samples for t in timings] == [5, 5]
    assert timings[0].median == pytest.approx(0.002, rel=1e-9)
    assert timings[1].median == pytest.approx(0.006, rel=1e-9)
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


def test_the_time_limit_stops_slow_rounds_after_three(monkeypatch):
    clock = _FakeClock()
    monkeypatch.setattr(_timing, "time", clock)

    def slow():
        clock.now += 0.02

    timings = _timing.measure_interleaved([slow], warmup=0, repeats=1000, max_seconds=0.01)
    assert timings[0].samples == 3


def test_measure_is_one_callable_of_the_interleaved_timer():
    calls = []
    timing = _timing.measure(lambda: calls.append(1), warmup=2, repeats=7)
    assert timing.samples == 7 and len(calls) == 9

    def broken():
        raise RuntimeError("kernel failed")

    with pytest.raises(RuntimeError, match="kernel failed"):
        _timing.measure(broken)


def test_progress_estimates_the_time_left(monkeypatch):
    """One line per step on a stream that is not a terminal: the step count, the elapsed time,
    from the second step on an estimate of the time left, and the caller's status."""
    import io

    clock = _FakeClock()
    monkeypatch.setattr(_timing, "time", clock)
    stream = io.StringIO()
    progress = _timing.Progress(3, stream=stream, status=lambda: "resident 1.00 GiB")
    for label in ("first", "second", "third"):
        progress.step(label)
        clock.now += 30.0
    progress.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("[1/3] 0:00 elapsed, resident 1.00 GiB  first"), lines
    assert "left" not in lines[0]
    # 30 s per step: after one step, two left (1:00); after two, one (0:30).
    assert lines[1] == "[2/3] 0:30 elapsed, ~1:00 left, resident 1.00 GiB  second", lines
    assert lines[2] == "[3/3] 1:00 elapsed, ~0:30 left, resident 1.00 GiB  third", lines
