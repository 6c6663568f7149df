"""``python -m benchmarks``: every implementation against torch eager, torch.compile and the
naive formula, against the memory roof measured in the same run.

    python -m benchmarks --quick                  # CPU, under 3 minutes on 2 cores (no compile)
    python -m benchmarks --device cuda            # the GPU set (fp32, bf16, fp16)
    python -m benchmarks --shapes cpu --out DIR   # the CPU default set

Writes results.csv, results.json, table.txt, command.txt and plots/*.png to the output
folder, and prints the table at the end.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys

import torch

from stablekernels import _timing

from . import cases, providers, report, runner

# Providers the quick set leaves out unless --providers names them: torch.compile compiles
# once per op, direction, shape and dtype, seconds each, more than the rest of the run.
QUICK_LEAVES_OUT = ("torch.compile",)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    sets = parser.add_mutually_exclusive_group()
    sets.add_argument(
        "--shapes",
        choices=sorted(cases.SHAPE_SETS),
        help="shape set (default: gpu on cuda, cpu on cpu)",
    )
    sets.add_argument(
        "--quick",
        action="store_const",
        const="quick",
        dest="shapes",
        help="the quick CPU set: two shapes, 7 rounds, no torch.compile unless named in "
        "--providers (its compiles alone take minutes); under 3 minutes on 2 cores",
    )
    sets.add_argument(
        "--smoke",
        action="store_const",
        const="smoke",
        dest="shapes",
        help="two tiny shapes, fp32: checks the plumbing",
    )
    parser.add_argument("--ops", nargs="+", choices=cases.OPS, default=list(cases.OPS))
    parser.add_argument(
        "--directions", nargs="+", choices=cases.DIRECTIONS, default=list(cases.DIRECTIONS)
    )
    parser.add_argument(
        "--dtypes", nargs="+", choices=sorted(cases.DTYPES), help="default: those of the shape set"
    )
    parser.add_argument(
        "--providers", nargs="+", help="only these providers (names as in the table)"
    )
    parser.add_argument(
        "--repeats", type=int, help="timed calls per row (default: 7 on smoke/quick, 20 otherwise)"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        help="untimed calls after the first (default: 1 on quick, 2 otherwise)",
    )
    parser.add_argument(
        "--huge-pages",
        choices=["on", "off"],
        default="on",
        help="CPU: torch's huge-page allocator (THP_MEM_ALLOC_ENABLE=1) for every provider, or "
        "plain 4 KiB pages for every provider (default: on)",
    )
    parser.add_argument("--out", help="output folder (default: benchmarks/out/<date>-<device>)")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    if args.shapes is None:
        args.shapes = "gpu" if args.device == "cuda" else "cpu"
    short = args.shapes in ("smoke", "quick")
    if args.repeats is None:
        args.repeats = 7 if short else 20
    if args.warmup is None:
        args.warmup = 1 if short else 2
    args.max_seconds = 0.4 if short else 2.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        runner.use_huge_pages(args.huge_pages == "on", argv)  # may re-execute this process
    started = datetime.datetime.now(datetime.timezone.utc)
    out_dir = args.out or f"benchmarks/out/{started:%Y%m%d-%H%M%S}-{args.device}"

    chosen = providers.all_providers(device.type)
    if args.providers:
        unknown = set(args.providers) - {p.name for p in chosen}
        if unknown:
            print(
                f"unknown or unavailable providers: {sorted(unknown)}; available: "
                f"{[p.name for p in chosen]}",
                file=sys.stderr,
            )
            return 2
        chosen = [p for p in chosen if p.name in args.providers]
    elif args.shapes == "quick":
        chosen = [p for p in chosen if p.name not in QUICK_LEAVES_OUT]
    todo = cases.build_cases(args.shapes, args.ops, args.directions, args.dtypes)

    allocator = (
        runner.steady_cpu_allocator() + "; " + runner.huge_pages_policy()
        if device.type == "cpu"
        else "the CUDA caching allocator"
    )
    progress = _timing.Progress(runner.count_steps(todo, chosen, device))
    rows, roofs = runner.run(
        todo,
        chosen,
        device,
        repeats=args.repeats,
        warmup=args.warmup,
        max_seconds=args.max_seconds,
        progress=progress,
    )
    progress.close()

    meta = report.machine_description(args.device)
    meta["command"] = "python -m benchmarks " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    meta["date"] = started.strftime("%Y-%m-%d %H:%M UTC")
    meta["allocator"] = allocator
    meta["seconds"] = round(
        (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(), 1
    )
    written = report.write_files(out_dir, rows, roofs, meta)
    if not args.no_plots:
        where = meta.get("gpu", meta["cpu"])
        written += report.plot(out_dir, rows, roofs, f" - {where}")

    print(report.table(rows))
    print(
        f"\nroofs timed beside each case: {roofs.span()}. 'of roof' = GB/s over the copy "
        "roof (read + write) timed in the same rounds; the read roof for logsumexp forward"
    )
    print(f"{len(rows)} rows in {meta['seconds']} s; wrote {len(written)} files to {out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
