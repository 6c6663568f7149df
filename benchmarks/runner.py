"""How it is measured: the roofs, timed calls with cold inputs, first-call (compile) time,
peak memory, and the correctness of every output.

Timing: the first call of each provider and case is timed on its own and reported as
``first_call_s`` (torch.compile and Triton compile there); more warm-up calls follow; then
the median with p20/p80 of the timed calls, the providers of a case and the two roofs
timed in interleaved rounds (one call of each in turn), so a drift of the machine's speed
touches them alike. CPU: inputs smaller than four times the last-level
cache are rotated among copies, so every call reads from memory. GPU: CUDA events, with the
L2 cache flushed before every call (stablekernels._timing).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass

import torch

from stablekernels import _timing

from .cases import Case, check, make_grad, make_input, make_target, reference
from .providers import Provider


@dataclass
class Row:
    """One line of the results."""

    op: str
    direction: str
    shape: str
    dim: int
    n: int
    rows: int
    dtype: str
    provider: str
    median_us: float = math.nan
    p20_us: float = math.nan
    p80_us: float = math.nan
    gbs: float = math.nan
    roof_gbs: float = math.nan
    roof_fraction: float = math.nan
    speedup_vs_torch: float = math.nan
    speedup_vs_compile: float = math.nan
    first_call_s: float = math.nan
    peak_mem_mib: float = math.nan
    correct: bool | None = None
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Roofs:
    """Measured bandwidths in bytes/s: a large device copy (read + write) and a large
    read-only reduction."""

    copy: float
    read: float


@dataclass
class RoofLog:
    """Every roof measured in a run: one pair per case, since a shared machine's bandwidth
    drifts over minutes and each case is compared with the roof timed beside it."""

    measured: list[Roofs]

    def summary(self) -> Roofs:
        """The median of each roof over the run."""
        copies = sorted(r.copy for r in self.measured)
        reads = sorted(r.read for r in self.measured)
        return Roofs(copies[len(copies) // 2], reads[len(reads) // 2])

    def span(self) -> str:
        copies = [r.copy / 1e9 for r in self.measured]
        reads = [r.read / 1e9 for r in self.measured]
        return (
            f"copy {min(copies):,.1f}-{max(copies):,.1f} GB/s, "
            f"read {min(reads):,.1f}-{max(reads):,.1f} GB/s, {len(copies)} measurements"
        )


def last_level_cache_bytes() -> int:
    """Size of the largest CPU cache (from sysfs), or 32 MiB when unknown."""
    sizes = []
    base = "/sys/devices/system/cpu/cpu0/cache"
    for entry in os.listdir(base) if os.path.isdir(base) else []:
        try:
            with open(os.path.join(base, entry, "size")) as f:
                text = f.read().strip()
        except OSError:
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=32 * 2**20)


def steady_cpu_allocator() -> str:
    """Fix glibc malloc's policy for large blocks for the rest of the process, and say what
    was done (recorded with the results).

    glibc serves a block above its mmap threshold with fresh pages from the kernel, and
    every first touch of those pages is a page fault that costs more than the copy itself
    (here: 5 GB/s into fresh pages against 30 GB/s into warm ones). The threshold moves on
    its own, from 128 KiB up to 32 MiB, with the sizes freed before, so whether a 16 MiB
    output comes warm from the heap or cold from the kernel depended on what ran earlier,
    and a provider's speed on the luck of its turn. Pinned at 32 MiB, with the heap never
    trimmed, blocks up to 32 MiB are reused warm (the steady state of a training loop) and
    larger ones always come fresh, for every provider alike."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return "default (no glibc mallopt)"
    m_trim_threshold, m_mmap_threshold = -1, -3
    if mallopt(m_mmap_threshold, 32 * 2**20) != 1 or mallopt(m_trim_threshold, 2**30) != 1:
        return "default (mallopt refused)"
    return "glibc, mmap threshold pinned at 32 MiB, heap not trimmed"


HUGE_PAGES_VARIABLE = "THP_MEM_ALLOC_ENABLE"


def use_huge_pages(on: bool, argv: list[str] | None) -> None:
    """Give every provider the same page policy: torch's CPU allocator reads
    THP_MEM_ALLOC_ENABLE once, at its first large allocation, and with it set to 1 advises
    blocks of 2 MiB and more onto transparent huge pages (Linux, THP in "madvise" mode), so
    a fresh output costs a page fault per 2 MiB instead of per 4 KiB. It applies to every
    tensor torch allocates, stablekernels' outputs included, so all providers run under one
    policy. The variable must be set before torch allocates:
    when it differs from what is asked, this process runs again with it set (os.execv)."""
    wanted = "1" if on else "0"
    if os.environ.get(HUGE_PAGES_VARIABLE, "0") == wanted:
        return
    os.environ[HUGE_PAGES_VARIABLE] = wanted
    args = sys.argv[1:] if argv is None else argv
    os.execv(sys.executable, [sys.executable, "-m", "benchmarks", *args])


def huge_pages_policy() -> str:
    """The page policy of this process, as recorded with the results."""
    if os.environ.get(HUGE_PAGES_VARIABLE, "0") == "1":
        return (
            f"{HUGE_PAGES_VARIABLE}=1 for every provider (torch's allocator advises blocks of "
            "2 MiB and more onto transparent huge pages)"
        )
    return f"{HUGE_PAGES_VARIABLE} unset for every provider (4 KiB pages)"


def roof_calls(device: torch.device):
    """(copy, read, nbytes): a device copy and a read-only reduction over a buffer far
    larger than any cache, timed beside the providers of each case."""
    elements = 2**28 if device.type == "cuda" else 2**25  # 1 GiB / 128 MiB of fp32
    src = torch.randn(elements, device=device)
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), (lambda: src.sum()), src.numel() * src.element_size()


def copies_for_cold_cache(case: Case, device: torch.device) -> int:
    """How many input copies to rotate through so each call misses the caches: enough to
    cycle through four times the last-level cache (twice was not enough on a VM whose
    reported L3 is smaller than what it can hit)."""
    if device.type != "cpu":
        return 1
    need = 4 * last_level_cache_bytes()
    return max(1, min(64, math.ceil(need / max(1, case.bytes_moved()))))


def timed_callable(case: Case, forward, x: torch.Tensor, dy: torch.Tensor, copies: int):
    """The function to time: forward on x, or the backward alone (autograd.grad of a kept
    graph, as a training step runs it), rotating among ``copies`` inputs."""
    if case.direction == "forward":
        inputs = [x] + [x.clone() for _ in range(copies - 1)]
        state = {"i": 0}

        def call():
            state["i"] = (state["i"] + 1) % copies
            return forward(inputs[state["i"]])

        return call
    graphs = []
    for i in range(copies):
        leaf = (x if i == 0 else x.clone()).detach().requires_grad_()
        graphs.append((forward(leaf), leaf, dy if i == 0 else dy.clone()))
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % copies
        out, leaf, grad = graphs[state["i"]]
        return torch.autograd.grad(out, leaf, grad, retain_graph=True)[0]

    return call


def run_once(case: Case, forward, x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    if case.direction == "forward":
        return forward(x)
    leaf = x.detach().requires_grad_()  # shares x's storage: no copy counted
    return torch.autograd.grad(forward(leaf), leaf, dy)[0]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2: the profiler's C++ side logs every start and stop there."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory_bytes(fn, device: torch.device) -> float:
    """Peak bytes allocated while ``fn()`` runs, above what was allocated before (the
    outputs included). CUDA: the caching allocator's statistics. CPU: the profiler's memory
    events (every tensor allocation and free), summed in time order."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del result
        return float(peak)
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    del result
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]"
    )
    level = peak = 0
    for _, nbytes in events:
        level += nbytes
        peak = max(peak, level)
    return float(peak)


def forward_of(case: Case, provider: Provider, target: torch.Tensor | None):
    """The provider's forward for the case, as a function of x alone (cross-entropy: bound
    to the case's targets)."""
    forward = provider.forward(case.op, case.dim)
    if target is None:
        return forward
    return lambda x: forward(x, target)


def prepare_case(
    case: Case,
    provider: Provider,
    device: torch.device,
    x,
    dy,
    ref,
    target: torch.Tensor | None = None,
):
    """(row, call): the provider's row with its first-call time, correctness and peak
    memory filled in, and the callable to time (None when the provider failed)."""
    row = Row(
        case.op,
        case.direction,
        case.shape_label,
        case.dim,
        case.n,
        case.rows,
        str(case.dtype).removeprefix("torch."),
        provider.name,
    )
    try:
        forward = forward_of(case, provider, target)
        start = time.perf_counter()
        out = run_once(case, forward, x, dy)
        _synchronize(device)
        row.first_call_s = time.perf_counter() - start
        row.correct, row.note = check(case, out, ref)
        del out
        row.peak_mem_mib = peak_memory_bytes(lambda: run_once(case, forward, x, dy), device) / 2**20
        return row, timed_callable(case, forward, x, dy, copies_for_cold_cache(case, device))
    except Exception as exc:  # a provider failing on a case is a result, not a crash
        _record_failure(row, exc)
        return row, None


def _record_failure(row: Row, exc: BaseException) -> None:
    row.correct = False
    row.note = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    if os.environ.get("STABLEKERNELS_BENCH_DEBUG"):
        traceback.print_exception(exc)


def run(
    cases: list[Case],
    providers: list[Provider],
    device: torch.device,
    *,
    repeats: int,
    warmup: int,
    max_seconds: float = 2.0,
    progress: _timing.Progress | None = None,
) -> tuple[list[Row], RoofLog]:
    """Measure every case with every provider that serves it; returns the rows and the
    roofs. Per case, the providers and the two roofs are timed in interleaved rounds
    (_timing.measure_interleaved), so the speed-ups and roof fractions compare calls made
    at the same moments even when the machine's bandwidth drifts."""
    log = RoofLog([])
    rows: list[Row] = []
    for case in cases:
        x = make_input(case, device)
        dy = make_grad(case, device) if case.direction == "backward" else None
        target = make_target(case, device)
        ref = reference(case, x, dy, target)
        prepared = []
        for provider in providers:
            if not provider.serves(case.op, case.shape, case.dim, device.type):
                continue
            if progress is not None:
                progress.step(f"{case.label} {provider.name}")
            prepared.append(prepare_case(case, provider, device, x, dy, ref, target))
        copy, read, roof_bytes = roof_calls(device)
        timed = [(row, call) for row, call in prepared if call is not None]
        timings = _timing.measure_interleaved(
            [copy, read] + [call for _, call in timed],
            device,
            warmup=warmup,
            repeats=repeats,
            max_seconds=max_seconds,
        )
        roofs = Roofs(copy=2 * roof_bytes / timings[0].median, read=roof_bytes / timings[1].median)
        log.measured.append(roofs)
        for (row, _), timing in zip(timed, timings[2:], strict=True):
            if isinstance(timing, BaseException):
                _record_failure(row, timing)
                continue
            row.median_us, row.p20_us, row.p80_us = (
                timing.median * 1e6,
                timing.p20 * 1e6,
                timing.p80 * 1e6,
            )
            row.gbs = case.bytes_moved() / timing.median / 1e9
        case_rows = [row for row, _ in prepared]
        roof = roofs.read if case.read_only else roofs.copy
        set_speedups(case_rows)
        for r in case_rows:
            r.roof_gbs = roof / 1e9
            r.roof_fraction = r.gbs * 1e9 / roof
        rows.extend(case_rows)
        del x, dy, ref, target, prepared, timed, copy, read
    return rows, log


def set_speedups(case_rows: list[Row]) -> None:
    """Each row's speed-up over torch eager and over torch.compile on the same case (NaN
    where that provider did not run)."""
    for name, field in (("torch", "speedup_vs_torch"), ("torch.compile", "speedup_vs_compile")):
        base = next((r for r in case_rows if r.provider == name), None)
        if base is None or not base.median_us > 0:
            continue
        for r in case_rows:
            setattr(r, field, base.median_us / r.median_us)


def count_steps(cases: list[Case], providers: list[Provider], device: torch.device) -> int:
    return sum(p.serves(c.op, c.shape, c.dim, device.type) for c in cases for p in providers)
