"""Wall-clock timing of a callable on CPU or GPU, a memory-bandwidth probe (:func:`copy_roof`)
and a one-line progress display.

Used by the demo and by the benchmark suite. CPU: the callable runs ``warmup`` times
untimed, then is timed call by call (several callables: in interleaved rounds, so a drift
of the machine's speed touches them alike). CUDA: each call is timed with CUDA events after an L2
flush (a write of a buffer larger than the cache), so every call reads from memory.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    """Seconds per call: the median and the 20th/80th percentiles over ``samples`` calls."""

    median: float
    p20: float
    p80: float
    samples: int


def _quantile(sorted_values: list[float], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def summarize(seconds: list[float]) -> Timing:
    values = sorted(seconds)
    return Timing(
        statistics.median(values), _quantile(values, 0.2), _quantile(values, 0.8), len(values)
    )


_L2_FLUSH: dict[torch.device, torch.Tensor] = {}


def _flush_l2(device: torch.device) -> None:
    buffer = _L2_FLUSH.get(device)
    if buffer is None:
        # 256 MiB: larger than the L2 of any current GPU (H100: 50 MiB).
        buffer = _L2_FLUSH[device] = torch.empty(64 * 2**20, dtype=torch.int32, device=device)
    buffer.zero_()


def _time_cpu_call(fn: Callable[[], object], device: torch.device) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _time_cuda_call(fn: Callable[[], object], device: torch.device) -> float:
    _flush_l2(device)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1e3


def measure(
    fn: Callable[[], object],
    device: torch.device | str = "cpu",
    *,
    warmup: int = 3,
    repeats: int = 20,
    max_seconds: float = 2.0,
) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then timed calls until there are ``repeats``
    of them or ``max_seconds`` have passed (with at least 3 samples). An exception of
    ``fn`` propagates. (measure_interleaved with one callable.)"""
    (result,) = measure_interleaved(
        [fn], device, warmup=warmup, repeats=repeats, max_seconds=max_seconds
    )
    if isinstance(result, BaseException):
        raise result
    return result


def measure_interleaved(
    fns: list[Callable[[], object]],
    device: torch.device | str = "cpu",
    *,
    warmup: int = 3,
    repeats: int = 20,
    max_seconds: float = 2.0,
) -> list[Timing | BaseException]:
    """Time several callables side by side: ``warmup`` untimed calls of each, then rounds
    in which each is timed once, in turn, until every one has ``repeats`` samples or
    ``max_seconds`` per callable have passed (at least 3 rounds). A machine whose speed
    drifts over seconds (a shared VM) then slows all of them alike, and their ratios hold;
    timing them one after the other would charge the drift to whichever ran during it.
    A callable that raises is dropped from the rounds; its exception takes its place in
    the result."""
    device = torch.device(device)
    time_call = _time_cuda_call if device.type == "cuda" else _time_cpu_call
    results: list[Timing | BaseException | None] = [None] * len(fns)
    samples: list[list[float]] = [[] for _ in fns]
    live = list(range(len(fns)))

    def attempt(i: int, call) -> None:
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - reported in the result, not raised
            results[i] = exc
            live.remove(i)

    for i in list(live):
        for _ in range(warmup):
            if i in live:
                attempt(i, fns[i])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    rounds = 0
    while live:
        for i in list(live):
            attempt(i, lambda i=i: samples[i].append(time_call(fns[i], device)))
        rounds += 1
        elapsed = time.perf_counter() - start
        if rounds >= repeats or (elapsed >= max_seconds * len(fns) and rounds >= 3):
            break
    return [r if r is not None else summarize(samples[i]) for i, r in enumerate(results)]


class Progress:
    """``[ 3/12] 0:04 elapsed, ~0:12 left  label`` rewritten in place on stderr while work
    goes on; erased by :meth:`close`. On a stream that is not a terminal it prints one line
    per step. The estimate assumes the steps left take as long as the steps so far;
    ``status``, if given, is called at each step for more to show (the benchmark runner
    shows its resident memory)."""

    def __init__(self, total: int, stream=None, status: Callable[[], str] | None = None) -> None:
        self.total, self.done = total, 0
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.status = status
        self.started = time.perf_counter()
        self._width = 0

    def step(self, label: str) -> None:
        elapsed = time.perf_counter() - self.started
        left = elapsed / self.done * (self.total - self.done) if self.done else None
        self.done += 1
        timing = f"{_clock(elapsed)} elapsed" + (f", ~{_clock(left)} left" if left else "")
        extra = f", {self.status()}" if self.status is not None else ""
        line = f"[{self.done:>{len(str(self.total))}}/{self.total}] {timing}{extra}  {label}"
        if self.tty:
            self.stream.write("\r" + line.ljust(self._width))
            self._width = max(self._width, len(line))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}:{secs:02d}"


def copy_roof(device: torch.device | str = "cpu") -> tuple[Callable[[], object], int]:
    """``(call, bytes_moved)``: a copy of a buffer far larger than any cache (2**25 float32,
    128 MiB, on CPU; 2**28, 1 GiB, on a GPU) and the bytes one call moves (a read and a
    write of the buffer). Timed in the same rounds as other callables, its bandwidth is the
    memory roof of that moment, and a wide spread of its times says the machine is busy."""
    device = torch.device(device)
    elements = 2**28 if device.type == "cuda" else 2**25
    src = torch.ones(elements, device=device)
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), 2 * src.numel() * src.element_size()


def steady_cpu_allocator() -> str:
    """Pin glibc malloc's policy for large blocks for the rest of the process, and say what
    was done (recorded with the results). Used by the demo's timing table and the benchmark
    runner, for every provider alike.

    glibc serves a block above its mmap threshold with fresh pages from the kernel, and
    every first touch of those pages is a page fault that costs more than the copy itself
    (5 GB/s into fresh pages against 30 GB/s into warm ones, on a 2-core VM). The threshold
    moves on its own, from 128 KiB up to 32 MiB, with the sizes freed before, so whether a
    16 MiB output comes warm from the heap or cold from the kernel depended on what ran
    earlier, and a provider's speed on the luck of its turn (in the demo's interleaved
    rounds: p80/p20 of 2-3 for a 4 MiB softmax on an idle machine). Pinned at 32 MiB, with
    the heap never trimmed, blocks up to 32 MiB are reused warm (the steady state of a
    training loop) and larger ones always come fresh."""
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return "malloc's default policy (no glibc mallopt)"
    m_trim_threshold, m_mmap_threshold = -1, -3
    if mallopt(m_mmap_threshold, 32 * 2**20) != 1 or mallopt(m_trim_threshold, 2**30) != 1:
        return "malloc's default policy (mallopt refused)"
    return "glibc malloc's mmap threshold pinned at 32 MiB and its heap not trimmed"
