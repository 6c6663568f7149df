"""``python -m stablekernels``: the stability demo.

Prints, side by side, the textbook formula, torch and stablekernels on the classic failure
cases of softmax, logsumexp and log_softmax (overflow, underflow, rounding near 0, float16
range), then what float32 does at the ends of its range, then the backends this machine has,
then a short timing table on the local device: the median and p20-p80 of each provider, and
the copy bandwidth of the machine timed beside them, with a warning when the spread of the
times says the machine is busy. Exits 0.

Each table is computed by a function that returns data (:func:`failure_cases`,
:func:`float32_limits`, :func:`backend_rows`, :func:`timing_table`, :func:`busy_signs`);
the ``print_*`` functions only format it.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass

import torch

from . import _api, _timing, backends, naive
from .ops import logsumexp as _logsumexp
from .ops import softmax as _softmax


def _fmt(value) -> str:
    if isinstance(value, torch.Tensor):
        values = value.detach().double().flatten().tolist()
        return "[" + ", ".join(_fmt(v) for v in values) + "]" if value.dim() else _fmt(values[0])
    if value == 0:
        return "0"
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return f"{value:.8g}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@dataclass(frozen=True)
class FailureCase:
    """One classic failure case: the input's description, the three implementations'
    outputs (in the input's dtype) and the exact value (float64, from closed forms)."""

    case: str
    naive: torch.Tensor
    torch: torch.Tensor
    stablekernels: torch.Tensor
    exact: torch.Tensor


def failure_cases() -> list[FailureCase]:
    """The classic failure cases (float32 unless the description says otherwise)."""
    big = torch.tensor([1000.0, 0.0])
    tie = torch.tensor([1000.0, 1000.0])
    tiny = torch.tensor([-1000.0, -1000.0])
    gap = torch.tensor([0.0, -20.0])
    half = torch.zeros(70000, dtype=torch.float16)

    def exact(*values: float) -> torch.Tensor:
        return torch.tensor(values if len(values) > 1 else values[0], dtype=torch.float64)

    return [
        FailureCase(
            "softmax([1000, 0])",
            naive.softmax(big),
            torch.softmax(big, 0),
            _softmax.softmax(big),
            exact(1.0, 0.0),  # exp(-1000) is 0 in float64 too
        ),
        FailureCase(
            "softmax([1000, 1000])",
            naive.softmax(tie),
            torch.softmax(tie, 0),
            _softmax.softmax(tie),
            exact(0.5, 0.5),
        ),
        FailureCase(
            "softmax([-1000, -1000])",
            naive.softmax(tiny),
            torch.softmax(tiny, 0),
            _softmax.softmax(tiny),
            exact(0.5, 0.5),
        ),
        FailureCase(
            "logsumexp([1000, 1000])",
            naive.logsumexp(tie),
            torch.logsumexp(tie, 0),
            _logsumexp.logsumexp(tie),
            exact(1000 + math.log(2)),
        ),
        FailureCase(
            "log_softmax([0, -20])[0]",
            naive.log_softmax(gap)[0],
            torch.log_softmax(gap, 0)[0],
            _softmax.log_softmax(gap)[0],
            exact(-math.log1p(math.exp(-20))),
        ),
        FailureCase(
            "logsumexp(70000 fp16 zeros)",
            naive.logsumexp(half),
            torch.logsumexp(half, 0),
            _logsumexp.logsumexp(half),
            exact(math.log(70000)),
        ),
    ]


def print_failure_cases() -> None:
    print("The classic failure cases (float32 unless said; exact values in the last column)")
    rows = [
        [c.case, _fmt(c.naive), _fmt(c.torch), _fmt(c.stablekernels), _fmt(c.exact)]
        for c in failure_cases()
    ]
    print(_table(["case", "naive", "torch", "stablekernels", "exact"], rows))


@dataclass(frozen=True)
class Float32Limits:
    """What float32 does at the ends of its range (1e-50 and 1e39 rounded to float32, the
    smallest and largest float32, exp(+-1000)), computed in float32 by torch."""

    small_stored: float  # 1e-50 rounded to float32
    small_ratio: float  # 1 * 1e-50 / 1e-50 in float32
    large_stored: float  # 1e39 rounded to float32
    large_ratio: float  # 1 * 1e39 / 1e39 in float32
    smallest: float  # the smallest positive float32 (a subnormal)
    largest: float  # the largest finite float32
    exp_1000: float  # exp(1000) in float32
    exp_minus_1000: float  # exp(-1000) in float32


def float32_limits() -> Float32Limits:
    f32 = torch.float32
    info = torch.finfo(f32)
    one = torch.tensor(1.0, dtype=f32)
    small = torch.tensor(1e-50, dtype=f32)
    large = torch.tensor(1e39, dtype=f32)
    return Float32Limits(
        small_stored=small.item(),
        small_ratio=(one * small / small).item(),
        large_stored=large.item(),
        large_ratio=(one * large / large).item(),
        # Below the smallest normal, float32 keeps eps-sized steps of it: the subnormals.
        smallest=info.smallest_normal * info.eps,
        largest=info.max,
        exp_1000=torch.exp(torch.tensor(1000.0, dtype=f32)).item(),
        exp_minus_1000=torch.exp(torch.tensor(-1000.0, dtype=f32)).item(),
    )


def print_float32_limits() -> None:
    lim = float32_limits()
    print(
        f"\nWhy: float32 holds magnitudes from {lim.smallest:.2g} to {lim.largest:.2g} only. "
        "Below: 1e-50 and 1e39 rounded to float32, the ends of its range, and exp(+-1000)"
    )
    rows = [
        ["1e-50 is stored as", _fmt(lim.small_stored), "so x * y / y =", _fmt(lim.small_ratio)],
        ["1e39 is stored as", _fmt(lim.large_stored), "so x * y / y =", _fmt(lim.large_ratio)],
        ["smallest positive", _fmt(lim.smallest), "largest", _fmt(lim.largest)],
        ["exp(1000) =", _fmt(lim.exp_1000), "exp(-1000) =", _fmt(lim.exp_minus_1000)],
    ]
    print(_table(["", "value", "", "result"], rows))


@dataclass(frozen=True)
class BackendRow:
    name: str
    summary: str
    available: bool  # runs on at least one device of this machine
    status: str  # where it runs, or why not, in words


def backend_rows() -> list[BackendRow]:
    available = set(_api.available_backends())
    return [
        BackendRow(name, b.summary, name in available, b.status())
        for name, b in backends.BACKENDS.items()
    ]


def print_backends() -> None:
    print("\nBackends on this machine")
    rows = [[r.name, r.summary, r.status] for r in backend_rows()]
    print(_table(["backend", "what", "status"], rows))


@dataclass(frozen=True)
class TimingRow:
    """One timed callable on one shape: seconds per call (median, 20th and 80th
    percentiles, over ``samples`` calls) and the bytes one call moves."""

    shape: tuple[int, int]
    provider: str
    median_s: float
    p20_s: float
    p80_s: float
    samples: int
    bytes_moved: int

    @property
    def gbs(self) -> float:
        """GB/s at the median time."""
        return self.bytes_moved / self.median_s / 1e9

    @property
    def spread(self) -> float:
        """p80 / p20 of the time: 1 on a steady machine, wide when it is busy."""
        return self.p80_s / self.p20_s if self.p20_s > 0 else math.inf


@dataclass(frozen=True)
class TimingTable:
    """The providers of each shape (``rows``), the copy roof timed in the same interleaved
    rounds as they (``roofs``, one per shape, provider ``"copy"``), and how many CPUs other
    work kept busy on average meanwhile (``other_cpus``: time of the other processes and
    time stolen by a hypervisor, from /proc/stat; None where there is none) of the
    machine's ``cpus``."""

    rows: list[TimingRow]
    roofs: list[TimingRow]
    other_cpus: float | None
    cpus: int


# Shapes whose call moves fewer bytes than this are timed back to back, without the copy.
WARM_BELOW_BYTES = 2**20
# The rounds of one shape stop after ``repeats`` calls of each, or after this many seconds
# per callable (with at least 3 calls).
MAX_SECONDS = 1.0
# Signs of a busy machine: p80/p20 of a call's time above BUSY_SPREAD (an idle machine stays
# well below), or other work keeping more than BUSY_OTHER_CPUS CPUs busy. The second catches
# what the first misses: a thread of a parallel op that waits a whole scheduler time slice
# for its CPU on every call is slow on every call, with a narrow spread.
BUSY_SPREAD = 1.5
BUSY_OTHER_CPUS = 0.5


def _cpu_seconds() -> tuple[float, float] | None:
    """(seconds the machine's CPUs have been busy, time stolen by a hypervisor included;
    seconds this process has run) so far. None without /proc/stat (not Linux)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
        per_second = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None
    if fields[0] != "cpu" or len(ticks) < 8:
        return None
    own = os.times()
    return (sum(ticks) - ticks[3] - ticks[4]) / per_second, own.user + own.system


def timing_providers(device: torch.device) -> list[tuple[str, object]]:
    """(label, softmax over the last dim) for each backend that serves ``device``, torch
    and the naive formula."""
    names = [n for n in _api.available_backends() if backends.BACKENDS[n].supports(device.type)]
    providers = [
        (f"stablekernels ({n})", lambda x, n=n: _softmax.softmax(x, backend=n)) for n in names
    ]
    providers += [
        ("torch.softmax", lambda x: torch.softmax(x, -1)),
        ("naive", lambda x: naive.softmax(x)),
    ]
    return providers


def _row(shape, label: str, t: _timing.Timing, bytes_moved: int) -> TimingRow:
    return TimingRow(tuple(shape), label, t.median, t.p20, t.p80, t.samples, bytes_moved)


def timing_table(device: torch.device, shapes, repeats: int) -> TimingTable:
    """Softmax forward, fp32, per shape: every provider and the copy roof
    (:func:`stablekernels._timing.copy_roof`) timed in interleaved rounds, one call of each
    in turn, so a drift of the machine's speed touches them alike. Each provider has its own
    copy of the input, which the large copy between its calls evicts from the caches. Shapes
    under :data:`WARM_BELOW_BYTES` are timed without the copy: their time is the per-call
    cost of back-to-back calls, as in a loop, which a cache-emptying copy would inflate
    several times over (torch.softmax 8 x 8: 4 us warm, 15 us after the copy)."""
    providers = timing_providers(device)
    copy, copy_bytes = _timing.copy_roof(device)
    progress = _timing.Progress(len(shapes))
    rows, roofs = [], []
    cpu_before, wall_before = _cpu_seconds(), time.perf_counter()
    for shape in shapes:
        x = torch.randn(shape, device=device)
        nbytes = 2 * x.numel() * x.element_size()  # one read and one write of the tensor
        with_copy = nbytes >= WARM_BELOW_BYTES
        progress.step(
            f"softmax {shape[0]}x{shape[1]}: {len(providers)} providers"
            + (" and a copy" if with_copy else "")
        )
        inputs = [x.clone() for _ in providers]
        calls = [lambda fn=fn, x=x: fn(x) for (_, fn), x in zip(providers, inputs, strict=True)]
        timings = _timing.measure_interleaved(
            [*calls, copy] if with_copy else calls,
            device,
            repeats=repeats,
            max_seconds=MAX_SECONDS,
        )
        for t in timings:
            if isinstance(t, BaseException):
                raise t
        rows += [
            _row(shape, label, t, nbytes)
            for (label, _), t in zip(providers, timings[: len(providers)], strict=True)
        ]
        if with_copy:
            roofs.append(_row(shape, "copy", timings[-1], copy_bytes))
    progress.close()
    cpu_after, wall = _cpu_seconds(), time.perf_counter() - wall_before
    other_cpus = None
    if cpu_before is not None and cpu_after is not None:
        busy, own = (after - before for after, before in zip(cpu_after, cpu_before, strict=True))
        other_cpus = max(0.0, busy - own) / wall
    return TimingTable(rows, roofs, other_cpus, os.cpu_count() or 1)


@dataclass(frozen=True)
class BusySigns:
    """Signs that the machine was busy while a :class:`TimingTable` was timed: the rows,
    copy roofs first, whose p80/p20 is above BUSY_SPREAD, and the CPUs other work kept busy
    if above BUSY_OTHER_CPUS (else None). Falsy when there are none."""

    wide: list[TimingRow]
    other_cpus: float | None

    def __bool__(self) -> bool:
        return bool(self.wide) or self.other_cpus is not None


def busy_signs(
    table: TimingTable, spread: float = BUSY_SPREAD, other_cpus: float = BUSY_OTHER_CPUS
) -> BusySigns:
    """The signs of a busy machine in ``table``, by the limits given (see BUSY_SPREAD)."""
    wide = [r for r in [*table.roofs, *table.rows] if r.spread > spread]
    others = table.other_cpus
    return BusySigns(wide, others if others is not None and others > other_cpus else None)


def _shape(shape: tuple[int, int]) -> str:
    return f"{shape[0]} x {shape[1]}"


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:,.1f}"


def print_timing(device: torch.device, repeats: int, allocator: str | None = None) -> None:
    """The timing table; ``allocator`` says how CPU memory was set up for it (if it was)."""
    # The first shape is tiny on purpose: its time is the per-call overhead.
    shapes = [(8, 8), (1024, 1024), (64, 32768)]
    table = timing_table(device, shapes, repeats)
    counts = sorted({r.samples for r in [*table.rows, *table.roofs]})
    calls = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    copy_mib = table.roofs[0].bytes_moved // 2 // 2**20 if table.roofs else 0
    print(
        f"\nsoftmax forward, float32, on {device} (median and p20-p80 of {calls} calls each; "
        f"the providers of a shape and a copy of {copy_mib} MiB timed in interleaved rounds)"
    )
    rows = [
        [
            _shape(r.shape),
            r.provider,
            _us(r.median_s),
            f"{_us(r.p20_s)}-{_us(r.p80_s)}",
            f"{r.gbs:,.2f}",
        ]
        for r in table.rows
    ]
    print(_table(["shape", "provider", "median us", "p20-p80 us", "GB/s"], rows))
    print(
        "GB/s counts one read and one write of the tensor. Each provider reads its own copy "
        "of the input, which the copy between its calls evicts from the caches; the "
        f"{_shape(shapes[0])} row, timed back to back without the copy, is the per-call "
        "overhead." + (f" Memory: {allocator}, as in the benchmark suite." if allocator else "")
    )
    print(
        f"\nCopy roof: a copy of {copy_mib} MiB on {device}, timed in the rounds of each shape "
        "from 1 MiB on"
    )
    rows = [
        [
            _shape(r.shape),
            f"{r.gbs:,.2f}",
            f"{r.bytes_moved / r.p80_s / 1e9:,.2f}-{r.bytes_moved / r.p20_s / 1e9:,.2f}",
            f"{r.spread:.2f}",
        ]
        for r in table.roofs
    ]
    print(_table(["rounds of", "copy GB/s", "p20-p80 GB/s", "p80/p20 time"], rows))
    if table.other_cpus is not None:
        print(
            f"Other work kept {table.other_cpus:.2f} of the {table.cpus} CPUs busy on average "
            "while this was timed (other processes and hypervisor steal, from /proc/stat)."
        )
    rule = (
        f"rule: p80/p20 of the time of the copy or of a provider above {BUSY_SPREAD}, or "
        f"other work keeping more than {BUSY_OTHER_CPUS} CPUs busy"
    )
    signs = busy_signs(table)
    if signs:
        named = [f"other work on {signs.other_cpus:.2f} CPUs"] if signs.other_cpus else []
        named += [f"{r.provider} at {_shape(r.shape)} {r.spread:.2f}x" for r in signs.wide]
        if len(named) > 6:
            named[5:] = [f"{len(named) - 5} more"]
        print(
            f"WARNING: this machine looks busy ({rule}): {', '.join(named)}. The times above "
            "may be noise; rerun on an idle machine before comparing them."
        )
    else:
        print(f"The machine looks idle ({rule}).")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m stablekernels",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="device for the timing table (default: cuda if present, else cpu)",
    )
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per row")
    parser.add_argument("--no-timing", action="store_true", help="skip the timing table")
    args = parser.parse_args(argv)

    print(
        f"stablekernels: numerically stable softmax, log_softmax, logsumexp "
        f"(torch {torch.__version__})\n"
    )
    print_failure_cases()
    print_float32_limits()
    print_backends()
    if not args.no_timing:
        device = torch.device(args.device)
        # Outputs warm from the heap on every call, so their page faults spread no times.
        allocator = _timing.steady_cpu_allocator() if device.type == "cpu" else None
        print_timing(device, args.repeats, allocator)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
