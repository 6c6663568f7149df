"""``python -m benchmarks.linear_cross_entropy``: the loss of an output layer, forward and
backward, time and peak memory, per provider.

    python -m benchmarks.linear_cross_entropy --out DIR       # the CPU set
    python -m benchmarks.linear_cross_entropy --shapes 512x256x8000 --dtypes fp32

Providers: the naive formula (``F.linear`` then ``F.cross_entropy``), torch's
``F.linear_cross_entropy`` (its reference path, and its chunked path with
``LinearCrossEntropyOptions()``), ``torch.compile`` of the naive formula, and
``sk.linear_cross_entropy`` on each backend that serves the device. ``--rounds`` rounds
each run every provider once, interleaved, each in a fresh process (same environment,
threads and allocator for all): inputs made, one untimed step (compiles, first-touch), then
``--repeats`` timed steps of forward + backward (gradients of input, weight and bias); the
time is the median over the rounds. Peak memory is the growth of the process's peak
resident set over the first step (VmHWM, reset to the resident set
just before it), inputs excluded: what the step itself allocates, its gradients included;
``beyond_grad_mib`` subtracts the gradients' own size (the same for every provider: dx,
dW, db in the inputs' dtypes), leaving what the loss itself holds. Every provider runs with
torch's default CPU allocator and thread count.
Writes ``results.csv``, ``table.txt`` and ``command.txt`` to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# ((tokens, H, V), dtype) of the CPU set: (4096, 1024, 32000) and (2048, 2048, 128256) in
# fp32; bf16 only small, as torch's bf16 matmul on a CPU without bf16 instructions runs at
# about 1 GFLOP/s (the large shapes would take hours a step).
CPU_SET = (
    ((4096, 1024, 32000), "fp32"),
    ((2048, 2048, 128256), "fp32"),
    ((256, 512, 8000), "fp32"),
    ((256, 512, 8000), "bf16"),
)


def _providers(device: str) -> list[str]:
    import stablekernels as sk
    from stablekernels import backends

    ours = [f"sk-{b}" for b in sk.available_backends() if backends.BACKENDS[b].supports(device)]
    return ["naive", "torch.lce", "torch.lce-chunked", "torch.compile", *ours]


def _loss_fn(provider: str):
    import stablekernels as sk

    def naive(x, w, b, t):
        return F.cross_entropy(F.linear(x, w, b), t)

    if provider == "naive":
        return naive
    if provider == "torch.lce":
        return lambda x, w, b, t: F.linear_cross_entropy(x, w, t, linear_bias=b)
    if provider == "torch.lce-chunked":
        options = torch.nn.LinearCrossEntropyOptions()
        return lambda x, w, b, t: F.linear_cross_entropy(x, w, t, linear_bias=b, options=options)
    if provider == "torch.compile":
        return torch.compile(naive)
    backend = provider.removeprefix("sk-")
    return lambda x, w, b, t: sk.linear_cross_entropy(x, w, t, linear_bias=b, backend=backend)


def _reset_peak() -> None:
    """Lowers the process's peak resident set to what it holds now (Linux: clear_refs 5),
    so that the setup's temporaries do not hide the step's own peak."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_mib() -> float:
    """The process's peak resident set since the last reset (VmHWM), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def worker(provider, tokens, hidden, vocab, dtype, repeats, device) -> dict:
    """One provider, one shape: the measurement of the module doc, as a dict."""
    torch.manual_seed(0)
    dt = DTYPES[dtype]
    x = torch.empty(tokens, hidden, device=device, dtype=dt).normal_().requires_grad_()
    w = torch.empty(vocab, hidden, device=device, dtype=dt).normal_(std=hidden**-0.5)
    w.requires_grad_()
    b = torch.zeros(vocab, device=device, dtype=dt, requires_grad=True)
    t = torch.randint(0, vocab, (tokens,), device=device)
    loss_fn = _loss_fn(provider)

    def step():
        loss = loss_fn(x, w, b, t)
        grads = torch.autograd.grad(loss, (x, w, b))
        if device == "cuda":
            torch.cuda.synchronize()
        return loss, grads

    if device == "cpu":
        _reset_peak()
    before = _peak_mib()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.max_memory_allocated() / 2**20
    loss, grads = step()
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _peak_mib()) - before
    grad_mib = sum(g.numel() * g.element_size() for g in grads) / 2**20
    del grads
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {
        "times": times,
        "peak_mib": peak,
        "beyond_grad_mib": peak - grad_mib,
        "loss": float(loss),
    }


def _measure(provider, shape, dtype, args) -> dict:
    command = [
        sys.executable,
        "-m",
        "benchmarks.linear_cross_entropy",
        "--worker",
        provider,
        "--shapes",
        "x".join(map(str, shape)),
        "--dtypes",
        dtype,
        "--repeats",
        str(args.repeats),
        "--device",
        args.device,
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _combine(results: list[dict]) -> dict:
    """One provider's rounds as one row: the median time over its rounds' timed steps, the
    largest peak (the first step of each round's process), or the first error."""
    errors = [r for r in results if "error" in r]
    if errors:
        return errors[0]
    combined = {
        "time_s": statistics.median([t for r in results for t in r["times"]]),
        "loss": results[0]["loss"],
    }
    for key in ("peak_mib", "beyond_grad_mib"):
        combined[key] = max(r[key] for r in results)
    return combined


def _shape(text: str) -> tuple[int, int, int]:
    tokens, hidden, vocab = (int(v) for v in text.split("x"))
    return tokens, hidden, vocab


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.linear_cross_entropy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--shapes",
        nargs="+",
        type=_shape,
        default=None,
        help="tokens x H x V, e.g. 4096x1024x32000 (default: the CPU set)",
    )
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=None)
    parser.add_argument("--providers", nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=1, help="timed steps per process")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        result = worker(args.worker, *args.shapes[0], args.dtypes[0], args.repeats, args.device)
        print(json.dumps(result))
        return

    if args.shapes is None and args.dtypes is None:
        cases = list(CPU_SET)
    else:
        shapes = args.shapes or list(dict.fromkeys(shape for shape, _ in CPU_SET))
        cases = [(shape, dtype) for shape in shapes for dtype in args.dtypes or ["fp32", "bf16"]]
    providers = args.providers or _providers(args.device)
    rows = []
    for (tokens, hidden, vocab), dtype in cases:
        # Rounds: each times every provider once (a fresh process each), so that a slow
        # spell of a shared machine falls on all providers alike.
        runs = {p: [] for p in providers}
        for _ in range(args.rounds):
            for provider in providers:
                result = _measure(provider, (tokens, hidden, vocab), dtype, args)
                runs[provider].append(result)
                print(json.dumps({"provider": provider, **result}), flush=True)
        for provider in providers:
            row = {"tokens": tokens, "H": hidden, "V": vocab, "dtype": dtype,
                   "provider": provider, **_combine(runs[provider])}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    table = _table(rows)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        fields = ["tokens", "H", "V", "dtype", "provider", "time_s", "peak_mib",
                  "beyond_grad_mib", "loss", "error"]  # fmt: skip
        with open(args.out / "results.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        (args.out / "table.txt").write_text(table + "\n")
        argv_text = shlex.join(
            ["python", "-m", "benchmarks.linear_cross_entropy", *(argv or sys.argv[1:])]
        )
        (args.out / "command.txt").write_text(
            f"{argv_text}\n"
            f"date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC\n"
            f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads\n"
            f"method: {args.rounds} rounds, each running every provider once in a fresh "
            f"process (providers interleaved); a process makes one untimed step, then "
            f"{args.repeats} timed step(s) (forward + backward, gradients of x, W, b); the "
            f"time is the median over all rounds' timed steps; "
            f"peak: the largest over rounds of the growth of the peak resident set (VmHWM, "
            f"reset before) over a process's first step (CPU), "
            f"torch.cuda.max_memory_allocated (GPU); beyond_grad: that minus the size of "
            f"the gradients returned (dx, dW, db)\n"
            f"allocator: torch's default CPU allocator (glibc malloc, no THP_MEM_ALLOC_ENABLE), "
            f"the same for every provider\n"
        )


def _table(rows) -> str:
    lines = [
        "| tokens x H x V | dtype | provider | fwd+bwd s | peak MiB | beyond grads MiB "
        "| x time vs naive | loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    naive = {
        (r["tokens"], r["H"], r["V"], r["dtype"]): r.get("time_s")
        for r in rows
        if r["provider"] == "naive"
    }
    for r in rows:
        shape = f"{r['tokens']} x {r['H']} x {r['V']}"
        if "error" in r:
            lines.append(
                f"| {shape} | {r['dtype']} | {r['provider']} | error: {r['error']} | | | | |"
            )
            continue
        base = naive.get((r["tokens"], r["H"], r["V"], r["dtype"]))
        speed = f"x{base / r['time_s']:.2f}" if base else ""
        lines.append(
            f"| {shape} | {r['dtype']} | {r['provider']} | {r['time_s']:.3f} | "
            f"{r['peak_mib']:.0f} | {r['beyond_grad_mib']:.0f} | {speed} | {r['loss']:.6f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
