"""``python -m stablekernels``: the stability demo.

Prints, side by side, the textbook formula, torch and stablekernels on the classic failure
cases of the seed tutorials, then the backends this machine has, then a short timing table
on the local device. Exits 0.

Each table is computed by a function that returns data (:func:`failure_cases`,
:func:`float32_limits`, :func:`backend_rows`, :func:`timing_rows`); the ``print_*``
functions only format it.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch

from . import _api, _timing, backends, naive


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
            _api.softmax(big),
            exact(1.0, 0.0),  # exp(-1000) is 0 in float64 too
        ),
        FailureCase(
            "softmax([1000, 1000])",
            naive.softmax(tie),
            torch.softmax(tie, 0),
            _api.softmax(tie),
            exact(0.5, 0.5),
        ),
        FailureCase(
            "softmax([-1000, -1000])",
            naive.softmax(tiny),
            torch.softmax(tiny, 0),
            _api.softmax(tiny),
            exact(0.5, 0.5),
        ),
        FailureCase(
            "logsumexp([1000, 1000])",
            naive.logsumexp(tie),
            torch.logsumexp(tie, 0),
            _api.logsumexp(tie),
            exact(1000 + math.log(2)),
        ),
        FailureCase(
            "log_softmax([0, -20])[0]",
            naive.log_softmax(gap)[0],
            torch.log_softmax(gap, 0)[0],
            _api.log_softmax(gap)[0],
            exact(-math.log1p(math.exp(-20))),
        ),
        FailureCase(
            "logsumexp(70000 fp16 zeros)",
            naive.logsumexp(half),
            torch.logsumexp(half, 0),
            _api.logsumexp(half),
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
    """What float32 does at the ends of its range (the seed's examples), computed in
    float32 by torch."""

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
        f"\nWhy: float32 holds magnitudes from {lim.smallest:.2g} to {lim.largest:.2g} only "
        "(the seed's examples)"
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
    shape: tuple[int, int]
    provider: str
    median_s: float
    gbs: float  # one read and one write of the tensor per call


def timing_providers(device: torch.device) -> list[tuple[str, object]]:
    """(label, softmax over the last dim) for each backend that serves ``device``, torch
    and the naive formula."""
    names = [n for n in _api.available_backends() if backends.BACKENDS[n].supports(device.type)]
    providers = [(f"stablekernels ({n})", lambda x, n=n: _api.softmax(x, backend=n)) for n in names]
    providers += [
        ("torch.softmax", lambda x: torch.softmax(x, -1)),
        ("naive", lambda x: naive.softmax(x)),
    ]
    return providers


def timing_rows(device: torch.device, shapes, repeats: int) -> list[TimingRow]:
    """One row per (shape, provider): softmax forward, fp32, median and GB/s."""
    providers = timing_providers(device)
    progress = _timing.Progress(len(shapes) * len(providers))
    rows = []
    for shape in shapes:
        x = torch.randn(shape, device=device)
        for label, fn in providers:
            progress.step(f"softmax {label} {shape[0]}x{shape[1]}")
            t = _timing.measure(lambda fn=fn, x=x: fn(x), device, repeats=repeats, max_seconds=1.0)
            gbs = 2 * x.numel() * x.element_size() / t.median / 1e9
            rows.append(TimingRow(tuple(shape), label, t.median, gbs))
    progress.close()
    return rows


def print_timing(device: torch.device, repeats: int) -> None:
    print(f"\nsoftmax forward, float32, on {device} (median of >= {repeats} calls)")
    # The first shape is tiny on purpose: its time is the per-call overhead.
    shapes = [(8, 8), (1024, 1024), (64, 32768)]
    rows = [
        [f"{r.shape[0]} x {r.shape[1]}", r.provider, f"{r.median_s * 1e6:,.1f}", f"{r.gbs:,.2f}"]
        for r in timing_rows(device, shapes, repeats)
    ]
    print(_table(["shape", "provider", "time (us)", "GB/s"], rows))
    print("GB/s counts one read and one write of the tensor.")


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
        print_timing(torch.device(args.device), args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
