"""``python -m benchmarks``: every implementation against torch eager, torch.compile and the
naive formula, against the memory roof measured in the same run.

    python -m benchmarks --quick                  # CPU: 2 shapes, 112 rows, no compile
    python -m benchmarks --device cuda            # the GPU set (fp32, bf16, fp16)
    python -m benchmarks --shapes cpu --out DIR   # the CPU default set

Writes results.csv (row by row as the run goes), then results.json, table.txt, command.txt
and plots/*.png to the output folder, and prints the table at the end.
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
        help="the quick CPU set: two shapes (cross-entropy: one), fp32 and bf16, 7 rounds, no "
        "torch.compile unless named in --providers (its compiles alone take minutes)",
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
    parser.add_argument(
        "--rotation-mib",
        type=float,
        default=runner.ROTATION_BUDGET_BYTES / 2**20,
        help="CPU: memory budget of one case's rotation of input copies (default: %(default)g); "
        "rows whose rotation is cut short of 4x the last-level cache say cold_cache=False",
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
    print("python -m benchmarks: finding the providers ...", file=sys.stderr, flush=True)
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
        _timing.steady_cpu_allocator() + "; " + runner.huge_pages_policy()
        if device.type == "cpu"
        else "the CUDA caching allocator"
    )
    steps = runner.count_steps(todo, chosen, device)
    print(
        f"python -m benchmarks: {steps} rows ({len(todo)} cases x "
        f"{', '.join(p.name for p in chosen)}) on {args.device}; results.csv in {out_dir} "
        "grows as they finish",
        file=sys.stderr,
        flush=True,
    )
    progress = _timing.Progress(steps, status=_resident_status)
    csv_log = report.ResultsCsv(out_dir)
    try:
        rows, roofs = runner.run(
            todo,
            chosen,
            device,
            repeats=args.repeats,
            warmup=args.warmup,
            max_seconds=args.max_seconds,
            rotation_budget=int(args.rotation_mib * 2**20),
            progress=progress,
            on_case_done=csv_log.append,
        )
    finally:
        csv_log.close()
        progress.close()

    meta = report.machine_description(args.device)
    meta["command"] = "python -m benchmarks " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    meta["date"] = started.strftime("%Y-%m-%d %H:%M UTC")
    meta["allocator"] = allocator
    meta["input rotation"] = (
        f"CPU: the providers of a case share one rotation of input copies, up to 4x the "
        f"last-level cache ({4 * runner.last_level_cache_bytes() / 2**20:,.0f} MiB) within "
        f"{args.rotation_mib:g} MiB; {sum(r.cold_cache is False for r in rows)} of "
        f"{len(rows)} rows had a shorter rotation (cold_cache=False)"
        if device.type == "cpu"
        else "GPU: the L2 cache flushed before every call"
    )
    meta["peak resident memory"] = f"{_peak_resident_bytes() / 2**30:.2f} GiB"
    meta["seconds"] = round(
        (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(), 1
    )
    written = [csv_log.path, *report.write_files(out_dir, rows, roofs, meta)]
    if not args.no_plots:
        where = meta.get("gpu", meta["cpu"])
        written += report.plot(out_dir, rows, roofs, f" - {where}")

    print(report.table(rows))
    print(
        f"\nroofs timed beside each case: {roofs.span()}. 'of roof' = GB/s over the copy "
        "roof (read + write) timed in the same rounds; the read roof for logsumexp forward"
    )
    print(f"input rotation: {meta['input rotation']}")
    print(
        f"{len(rows)} rows in {meta['seconds']} s, peak resident memory "
        f"{meta['peak resident memory']}; wrote {len(written)} files to {out_dir}"
    )
    return 0


def _resident_status() -> str:
    """The progress line's memory column."""
    return f"resident {runner.resident_bytes() / 2**30:.2f} GiB"


def _peak_resident_bytes() -> float:
    """The peak resident memory of this process so far (Linux: ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


if __name__ == "__main__":
    raise SystemExit(main())
