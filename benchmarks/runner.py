"""How it is measured: the roofs, timed calls with cold inputs, first-call (compile) time,
peak memory, and the correctness of every output.

Timing: the first call of each provider and case is timed on its own and reported as
``first_call_s`` (torch.compile and Triton compile there); more warm-up calls follow; then
the median with p20/p80 of the timed calls, the providers of a case and the two roofs
timed in interleaved rounds (one call of each in turn), so a drift of the machine's speed
touches them alike. CPU: the timed calls of all providers of a case take their inputs in turn
from one rotation of copies spanning four times the last-level cache, within a memory budget
(so every call reads from memory where the budget allows; rows say when it did not). GPU:
CUDA events, with the L2 cache flushed before every call (stablekernels._timing).

Memory: everything a case allocates (inputs, rotation, graphs, outputs) is dropped before
the next case, so the process's resident memory stays within the rotation budget plus one
case's working set, whatever the number of rows.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
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
    cold_cache: bool | None = None  # CPU: the input rotation spanned 4x the last-level cache
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
    copy, copy_bytes = _timing.copy_roof(device)  # 1 GiB / 128 MiB of fp32
    src = torch.randn(copy_bytes // 2 // 4, device=device)
    return copy, (lambda: src.sum()), copy_bytes // 2


ROTATION_BUDGET_BYTES = 2**29  # default memory budget of one case's input rotation (CPU)
MAX_ROTATION_COPIES = 64


def wanted_copies(case: Case, device: torch.device) -> int:
    """How many input copies the timed calls should rotate through so each call misses the
    caches: enough to cycle through four times the last-level cache (twice was not enough
    on a VM whose reported L3 is smaller than what it can hit). One on a GPU (its L2 is
    flushed before each call instead)."""
    if device.type != "cpu":
        return 1
    need = 4 * last_level_cache_bytes()
    return max(1, min(MAX_ROTATION_COPIES, math.ceil(need / max(1, case.bytes_moved()))))


def copies_for_cold_cache(
    case: Case,
    device: torch.device,
    graph_bytes: float = 0.0,
    budget: int = ROTATION_BUDGET_BYTES,
) -> int:
    """The copies of the rotation: :func:`wanted_copies`, cut to what fits ``budget`` bytes.
    One copy holds the input (and the output gradient, backward) plus ``graph_bytes``, what
    the kept forward graphs of all providers hold per copy (backward). A machine whose
    last-level cache is reported as hundreds of MiB would otherwise hold gigabytes of
    copies per case (480 MiB of L3: 64 copies of every input)."""
    wanted = wanted_copies(case, device)
    size = case.numel * torch.finfo(case.dtype).bits // 8
    per_copy = size * (2 if case.direction == "backward" else 1) + graph_bytes
    return max(1, min(wanted, int(budget // max(1.0, per_copy))))


class Rotation:
    """Copies of a case's input (and output gradient) that the timed calls of every provider
    take in turn: one position shared by all of them, so consecutive calls, whichever
    provider makes them, read different copies, and a copy comes round again only after
    ``len(xs)`` calls. Sharing the copies across providers keeps the memory of the rotation
    that of one provider."""

    def __init__(self, x: torch.Tensor, dy: torch.Tensor | None, copies: int) -> None:
        self.xs = [x] + [x.clone() for _ in range(copies - 1)]
        self.dys = None if dy is None else [dy] + [dy.clone() for _ in range(copies - 1)]
        self.position = 0

    def __len__(self) -> int:
        return len(self.xs)

    def advance(self) -> int:
        self.position = (self.position + 1) % len(self.xs)
        return self.position


def timed_callable(case: Case, forward, rotation: Rotation):
    """The function to time: forward on the rotation's next input, or the backward alone
    (autograd.grad of a kept graph, as a training step runs it; one graph per copy, on
    leaves that share the copies' storage)."""
    if case.direction == "forward":
        return lambda: forward(rotation.xs[rotation.advance()])
    graphs = []
    for x, dy in zip(rotation.xs, rotation.dys, strict=True):
        leaf = x.detach().requires_grad_()
        graphs.append((forward(leaf), leaf, dy))

    def call():
        out, leaf, grad = graphs[rotation.advance()]
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
    """(row, forward): the provider's row with its first-call time, correctness and peak
    memory filled in, and its forward (None when the provider failed)."""
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
        return row, forward
    except Exception as exc:  # a provider failing on a case is a result, not a crash
        _record_failure(row, exc)
        return row, None


def _record_failure(row: Row, exc: BaseException) -> None:
    row.correct = False
    row.note = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    if os.environ.get("STABLEKERNELS_BENCH_DEBUG"):
        traceback.print_exception(exc)


def resident_bytes() -> float:
    """This process's resident memory now (Linux /proc/self/statm), NaN elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return math.nan


def run(
    cases: list[Case],
    providers: list[Provider],
    device: torch.device,
    *,
    repeats: int,
    warmup: int,
    max_seconds: float = 2.0,
    rotation_budget: int = ROTATION_BUDGET_BYTES,
    progress: _timing.Progress | None = None,
    on_case_done: Callable[[list[Row]], None] | None = None,
) -> tuple[list[Row], RoofLog]:
    """Measure every case with every provider that serves it; returns the rows and the
    roofs. Per case, the providers and the two roofs are timed in interleaved rounds
    (_timing.measure_interleaved), so the speed-ups and roof fractions compare calls made
    at the same moments even when the machine's bandwidth drifts. ``on_case_done`` receives
    each case's rows as soon as they are measured (the CLI appends them to results.csv)."""
    log = RoofLog([])
    rows: list[Row] = []
    for case in cases:
        case_rows = _run_case(
            case, providers, device, log, repeats, warmup, max_seconds, rotation_budget, progress
        )
        rows.extend(case_rows)
        if on_case_done is not None:
            on_case_done(case_rows)
    return rows, log


def _run_case(
    case: Case,
    providers: list[Provider],
    device: torch.device,
    log: RoofLog,
    repeats: int,
    warmup: int,
    max_seconds: float,
    rotation_budget: int,
    progress: _timing.Progress | None,
) -> list[Row]:
    """One case's rows. Every tensor it makes (inputs, rotation, graphs, roof buffers) is
    local to this call and gone when it returns."""
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
    del ref
    working = [(row, forward) for row, forward in prepared if forward is not None]
    # Per copy, the backward keeps each provider's forward graph; its peak (forward and
    # backward of one call) bounds what the graph holds.
    graph_bytes = (
        sum(row.peak_mem_mib * 2**20 for row, _ in working if not math.isnan(row.peak_mem_mib))
        if case.direction == "backward"
        else 0.0
    )
    rotation = Rotation(x, dy, copies_for_cold_cache(case, device, graph_bytes, rotation_budget))
    cold = device.type != "cpu" or len(rotation) >= wanted_copies(case, device)
    timed = []
    for row, forward in working:
        try:
            timed.append((row, timed_callable(case, forward, rotation)))
        except Exception as exc:  # building the kept graphs can fail too
            _record_failure(row, exc)
    copy, read, roof_bytes = roof_calls(device)
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
        row.cold_cache = cold
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
    return case_rows


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
