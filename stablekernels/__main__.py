"""``python -m stablekernels``: the stability demo.

Prints, side by side, the textbook formula, torch and stablekernels on the classic failure
cases of the seed tutorials, then the backends this machine has, then a short timing table
on the local device. Exits 0.
"""

from __future__ import annotations

import argparse
import math
import warnings

import numpy as np
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


def failure_cases() -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(case, naive, torch, stablekernels) for each classic failure case."""
    big = torch.tensor([1000.0, 0.0])
    tie = torch.tensor([1000.0, 1000.0])
    tiny = torch.tensor([-1000.0, -1000.0])
    gap = torch.tensor([0.0, -20.0])
    half = torch.zeros(70000, dtype=torch.float16)
    return [
        ("softmax([1000, 0])", naive.softmax(big), torch.softmax(big, 0), _api.softmax(big)),
        ("softmax([1000, 1000])", naive.softmax(tie), torch.softmax(tie, 0), _api.softmax(tie)),
        (
            "softmax([-1000, -1000])",
            naive.softmax(tiny),
            torch.softmax(tiny, 0),
            _api.softmax(tiny),
        ),
        (
            "logsumexp([1000, 1000])",
            naive.logsumexp(tie),
            torch.logsumexp(tie, 0),
            _api.logsumexp(tie),
        ),
        (
            "log_softmax([0, -20])[0]",
            naive.log_softmax(gap)[0],
            torch.log_softmax(gap, 0)[0],
            _api.log_softmax(gap)[0],
        ),
        (
            "logsumexp(70000 fp16 zeros)",
            naive.logsumexp(half),
            torch.logsumexp(half, 0),
            _api.logsumexp(half),
        ),
    ]


def print_failure_cases() -> None:
    print("The classic failure cases (float32 unless said; exact values in the last column)")
    exact = [
        "[1, 0]",
        "[0.5, 0.5]",
        "[0.5, 0.5]",
        f"{1000 + math.log(2):.8g}",
        f"{-math.log1p(math.exp(-20)):.8g}",
        f"{math.log(70000):.8g}",
    ]
    rows = [
        [case, _fmt(a), _fmt(b), _fmt(c), e]
        for (case, a, b, c), e in zip(failure_cases(), exact, strict=True)
    ]
    print(_table(["case", "naive", "torch", "stablekernels", "exact"], rows))


def print_float32_limits() -> None:
    print("\nWhy: float32 holds magnitudes from 1.4e-45 to 3.4e38 only (the seed's examples)")
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        one = np.float32(1)
        small, large = np.float32(1e-50), np.float32(1e39)
        rows = [
            [
                "1e-50 is stored as",
                _fmt(float(small)),
                "so x * y / y =",
                _fmt(float(one * small / small)),
            ],
            [
                "1e39 is stored as",
                _fmt(float(large)),
                "so x * y / y =",
                _fmt(float(one * large / large)),
            ],
            [
                "smallest positive",
                _fmt(float(np.nextafter(np.float32(0), np.float32(1)))),
                "largest",
                _fmt(float(np.finfo(np.float32).max)),
            ],
            [
                "exp(1000) =",
                _fmt(torch.exp(torch.tensor(1000.0))),
                "exp(-1000) =",
                _fmt(torch.exp(torch.tensor(-1000.0))),
            ],
        ]
    print(_table(["", "value", "", "result"], rows))


def print_backends() -> None:
    print("\nBackends on this machine")
    rows = [[name, b.summary, b.status()] for name, b in backends.BACKENDS.items()]
    print(_table(["backend", "what", "status"], rows))


def timing_rows(device: torch.device, shapes, repeats: int) -> list[list[str]]:
    """One row per (shape, provider): softmax forward, fp32, median and GB/s."""
    names = [
        n for n in _api.available_backends() if backends.BACKENDS[n].reason(device.type) is None
    ]
    providers = [(f"stablekernels ({n})", lambda x, n=n: _api.softmax(x, backend=n)) for n in names]
    providers += [
        ("torch.softmax", lambda x: torch.softmax(x, -1)),
        ("naive", lambda x: naive.softmax(x)),
    ]
    progress = _timing.Progress(len(shapes) * len(providers))
    rows = []
    for shape in shapes:
        x = torch.randn(shape, device=device)
        for label, fn in providers:
            progress.step(f"softmax {label} {shape[0]}x{shape[1]}")
            t = _timing.measure(lambda fn=fn, x=x: fn(x), device, repeats=repeats, max_seconds=1.0)
            gbs = 2 * x.numel() * x.element_size() / t.median / 1e9
            rows.append(
                [f"{shape[0]} x {shape[1]}", label, f"{t.median * 1e6:,.1f}", f"{gbs:,.2f}"]
            )
    progress.close()
    return rows


def print_timing(device: torch.device, repeats: int) -> None:
    print(f"\nsoftmax forward, float32, on {device} (median of >= {repeats} calls)")
    # The first shape is tiny on purpose: its time is the per-call overhead.
    shapes = [(8, 8), (1024, 1024), (64, 32768)]
    rows = timing_rows(device, shapes, repeats)
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
