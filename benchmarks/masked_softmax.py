"""``python -m benchmarks.masked_softmax``: the attention softmax ``softmax(scale * scores +
mask)`` with a key-padding or a causal mask, forward and forward + backward, per provider.

    python -m benchmarks.masked_softmax --out DIR                  # the CPU set
    python -m benchmarks.masked_softmax --shapes 2x2x256 --dtypes fp32 --repeats 3

Shapes are (B, H, S): scores (B, H, S, S). Masks: ``padding`` (a (B, 1, 1, S) bool mask,
the last quarter of each sequence padded, and one sequence padded entirely: rows with
nothing kept), ``causal`` (keys after the query dropped). Providers, each given the same
bool "keep" mask (built outside the timing) and computing the same function:

- ``torch``: ``torch.softmax((scores * scale).masked_fill(~keep, -inf), -1)`` (the usual
  eager code: NaN on a row with nothing kept);
- ``torch._masked_softmax``: torch's fused masked softmax (``scores * scale`` first; mask
  type 1, (B, S) key padding, or type 0, (S, S), for causal);
- ``torch.compile``: torch.compile of the eager code;
- ``sk-<backend>``: ``sk.softmax(scores, scale=scale, mask=keep)`` (padding) or
  ``sk.softmax(scores, scale=scale, causal=True)`` on each backend that serves the device.

All run in one process, in interleaved rounds (each round times every provider once, in a
rotated order), with torch's default allocator and thread count; outputs are fresh tensors
each call (as in a model). Reported: the median over rounds, ``x torch`` (the eager code's
median over ours, same rounds). Writes ``results.csv``, ``table.txt`` and ``command.txt``.
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
import sys
import time
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (B, H, S): B * H = 32 at S = 512 and 2048; at S = 8192 the scores of 32 heads (8 GiB in
# fp32) do not fit beside their gradient on the CPU machine, so 2 heads there.
CPU_SHAPES = ((4, 8, 512), (4, 8, 2048), (1, 2, 8192))
MASKS = ("padding", "causal")
DIRECTIONS = ("forward", "forward+backward")


def _keep_mask(kind: str, b: int, s: int) -> torch.Tensor:
    """The bool mask (True keeps) every provider is given, broadcastable to (B, H, S, S)."""
    if kind == "causal":
        return torch.ones(s, s, dtype=torch.bool).tril()
    keep = torch.ones(b, 1, 1, s, dtype=torch.bool)
    keep[..., s - s // 4 :] = False
    keep[-1] = False  # one sequence entirely padded: rows with nothing kept
    return keep


def _providers(device: str) -> list[str]:
    import stablekernels as sk
    from stablekernels import backends

    ours = [f"sk-{b}" for b in sk.available_backends() if backends.BACKENDS[b].supports(device)]
    return ["torch", "torch._masked_softmax", "torch.compile", *ours]


def _function(provider: str, kind: str, keep: torch.Tensor, scale: float):
    import stablekernels as sk

    def eager(x):
        return torch.softmax((x * scale).masked_fill(~keep, float("-inf")), -1)

    if provider == "torch":
        return eager
    if provider == "torch.compile":
        # A fresh compile per case: dynamo's cache of this code object would otherwise hit
        # its recompile limit over the cases and silently run the rest eagerly.
        torch._dynamo.reset()
        return torch.compile(eager)
    if provider == "torch._masked_softmax":
        if kind == "causal":
            dropped, mask_type = ~keep, 0  # (S, S)
        else:
            dropped, mask_type = ~keep.reshape(keep.shape[0], -1), 1  # (B, S)
        return lambda x: torch._masked_softmax(x * scale, dropped, x.dim() - 1, mask_type)
    backend = provider.removeprefix("sk-")
    if kind == "causal":
        return lambda x: sk.softmax(x, scale=scale, causal=True, backend=backend)
    return lambda x: sk.softmax(x, scale=scale, mask=keep, backend=backend)


def _step(fn, x, grad, direction):
    if direction == "forward":
        with torch.no_grad():
            return fn(x)
    y = fn(x)
    return torch.autograd.grad(y, x, grad)


def measure(shape, dtype, kind, direction, providers, repeats, device="cpu"):
    """{provider: [seconds per round]} for one case, the providers interleaved."""
    b, h, s = shape
    torch.manual_seed(0)
    x = torch.randn(b, h, s, s, device=device, dtype=DTYPES[dtype])
    x.requires_grad_(direction != "forward")
    grad = torch.randn_like(x) if direction != "forward" else None
    keep = _keep_mask(kind, b, s).to(device)
    scale = 1.0 / 8.0
    fns = {p: _function(p, kind, keep, scale) for p in providers}
    times: dict[str, list[float]] = {p: [] for p in providers}
    errors: dict[str, str] = {}
    for p, fn in fns.items():  # warm-up: compiles, first touch
        try:
            _step(fn, x, grad, direction)
        except Exception as exc:  # noqa: BLE001  (reported per provider)
            errors[p] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:150]}"
    alive = [p for p in providers if p not in errors]
    for r in range(repeats):
        for p in alive[r % len(alive) :] + alive[: r % len(alive)] if alive else []:
            start = time.perf_counter()
            _step(fns[p], x, grad, direction)
            times[p].append(time.perf_counter() - start)
    return times, errors


def _rows(args):
    providers = args.providers or _providers(args.device)
    for shape in args.shapes:
        for dtype in args.dtypes:
            for kind in args.masks:
                for direction in args.directions:
                    times, errors = measure(
                        shape, dtype, kind, direction, providers, args.repeats, args.device
                    )
                    base = statistics.median(times["torch"]) if times.get("torch") else None
                    for p in providers:
                        row = {"B": shape[0], "H": shape[1], "S": shape[2], "dtype": dtype,
                               "mask": kind, "direction": direction, "provider": p}  # fmt: skip
                        if p in errors:
                            row["error"] = errors[p]
                        else:
                            median = statistics.median(times[p])
                            row.update(
                                time_ms=median * 1e3,
                                p20_ms=_quantile(times[p], 0.2) * 1e3,
                                p80_ms=_quantile(times[p], 0.8) * 1e3,
                                x_torch=base / median if base else None,
                            )
                        print(json.dumps(row), flush=True)
                        yield row


def _quantile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _table(rows) -> str:
    lines = [
        "| B x H x S | dtype | mask | direction | provider | ms (p20-p80) | x torch |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        case = f"| {r['B']} x {r['H']} x {r['S']} | {r['dtype']} | {r['mask']} | {r['direction']} "
        if "error" in r:
            lines.append(f"{case}| {r['provider']} | error: {r['error']} | |")
            continue
        speed = f"x{r['x_torch']:.2f}" if r.get("x_torch") else ""
        lines.append(
            f"{case}| {r['provider']} | {r['time_ms']:.2f} ({r['p20_ms']:.2f}-"
            f"{r['p80_ms']:.2f}) | {speed} |"
        )
    return "\n".join(lines)


def _shape(text: str) -> tuple[int, int, int]:
    b, h, s = (int(v) for v in text.split("x"))
    return b, h, s


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.masked_softmax",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", nargs="+", type=_shape, default=list(CPU_SHAPES),
                        help="B x H x S, e.g. 4x8x2048")  # fmt: skip
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--masks", nargs="+", choices=MASKS, default=list(MASKS))
    parser.add_argument("--directions", nargs="+", choices=DIRECTIONS, default=list(DIRECTIONS))
    parser.add_argument("--providers", nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = list(_rows(args))
    table = _table(rows)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        fields = ["B", "H", "S", "dtype", "mask", "direction", "provider", "time_ms", "p20_ms",
                  "p80_ms", "x_torch", "error"]  # fmt: skip
        with open(args.out / "results.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        (args.out / "table.txt").write_text(table + "\n")
        argv_text = shlex.join(["python", "-m", "benchmarks.masked_softmax",
                                *(argv or sys.argv[1:])])  # fmt: skip
        (args.out / "command.txt").write_text(
            f"{argv_text}\n"
            f"date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC\n"
            f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads\n"
            f"method: one process; per case one untimed call per provider, then "
            f"{args.repeats} rounds, each timing every provider once (rotated order); "
            f"median and p20-p80 over rounds; scale 1/8; fresh outputs each call; torch's "
            f"default allocator for all\n"
        )


if __name__ == "__main__":
    main()
