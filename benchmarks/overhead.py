"""``python -m benchmarks.overhead``: what one call costs around its kernels, per op and
direction: aten ops per call, launches per call, extension kernel calls per call and
microseconds per call, for torch eager, torch.compile and each stablekernels backend that
serves the device.

    python -m benchmarks.overhead --out DIR                       # every op, shape, provider
    python -m benchmarks.overhead --shapes 8x128 --ops softmax --providers torch sk-cpp

Counts come from torch.profiler over one call after warm-up:

- ``aten ops``: leaf ops (``aten::*`` and ``stablekernels::*`` with no such op below them):
  each is a dispatch, and on a GPU each that touches data is a kernel launch;
- ``launches``: those leaves that run over data, i.e. all but views, allocations,
  read-backs (``aten::view``, ``aten::empty``, ``aten::item``, ...) and the entries of
  stablekernels' own ops (their kernels are counted where they run);
- ``sk kernels``: calls of the extension's kernel ops (``stablekernels::_fused_*``);
- ``syncs``: read-backs of a value to the host (``aten::_local_scalar_dense``), a device
  synchronisation on a GPU.

torch.compile runs generated code that the profiler does not see op by op: its counts are
left out. Time: microseconds per call, the best of ``--rounds`` rounds, each round timing
every provider of a case in turn (interleaved) over as many calls as fill ``--seconds``.
One thread by default (``--threads``), as per-call costs are compared. Directions:
``forward`` under ``torch.no_grad()``; ``forward+backward`` from an input that requires grad
(the loss's, or the output's sum against a fixed gradient, backward).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

SHAPES = ((8, 128), (64, 1000), (4096, 32000))
DIRECTIONS = ("forward", "forward+backward")
# The ops, each a function of (x, target) per provider kind: torch eager code (also what
# torch.compile compiles) and stablekernels with a backend.
OPS = ("softmax", "log_softmax", "logsumexp", "cross_entropy", "cross_entropy+options",
       "masked_softmax")  # fmt: skip
SMOOTHING, Z_LOSS, SCALE = 0.1, 1e-4, 0.125

# Leaves that run no kernel over data: views and metadata, allocations, host read-backs, and
# conversions that convert nothing (a leaf `to` or `contiguous` has no copy below it).
NOT_LAUNCHES = frozenset(
    "aten::" + name
    for name in (
        "view _unsafe_view as_strided expand expand_as t transpose permute unsqueeze squeeze "
        "select slice narrow alias detach detach_ lift_fresh reshape _reshape_alias flatten "
        "unflatten movedim view_as split unbind diagonal empty empty_like empty_strided "
        "resize_ new_empty new_empty_strided _local_scalar_dense item is_nonzero "
        "set_ result_type can_cast to contiguous"
    ).split()
)
SYNCS = frozenset({"aten::_local_scalar_dense"})


def _torch_function(op: str, shape: tuple[int, int], device: str) -> Callable:
    """The op as torch eager code (what users write without stablekernels)."""
    if op in ("softmax", "log_softmax"):
        fn = getattr(torch, op)
        return lambda x, t: fn(x, -1)
    if op == "logsumexp":
        return lambda x, t: torch.logsumexp(x, -1)
    if op == "cross_entropy":
        return lambda x, t: F.cross_entropy(x, t)
    if op == "cross_entropy+options":
        return lambda x, t: (
            F.cross_entropy(x, t, label_smoothing=SMOOTHING)
            + Z_LOSS * torch.logsumexp(x, -1).pow(2).mean()
        )
    # Causal, the rows the last queries of a square: key j kept for row i when j <= i + n - rows
    # (the mask made once, outside the calls, as a model keeps its causal mask).
    drop = ~torch.ones(shape, dtype=torch.bool, device=device).tril(shape[1] - shape[0])
    return lambda x, t: torch.softmax((x * SCALE).masked_fill(drop, float("-inf")), -1)


def _stablekernels_function(op: str, backend: str) -> Callable:
    import stablekernels as sk

    if op in ("softmax", "log_softmax"):
        fn = getattr(sk, op)
        return lambda x, t: fn(x, -1, backend=backend)
    if op == "logsumexp":
        return lambda x, t: sk.logsumexp(x, -1, backend=backend)
    if op == "cross_entropy":
        return lambda x, t: sk.cross_entropy(x, t, backend=backend)
    if op == "cross_entropy+options":
        return lambda x, t: sk.cross_entropy(
            x, t, label_smoothing=SMOOTHING, z_loss=Z_LOSS, backend=backend
        )
    # Causal with the queries the last rows of a square: causal_offset = n - rows.
    return lambda x, t: sk.softmax(
        x, -1, scale=SCALE, causal=True, causal_offset=x.shape[1] - x.shape[0], backend=backend
    )


def providers(device: str) -> list[str]:
    import stablekernels as sk
    from stablekernels import backends

    ours = [f"sk-{b}" for b in sk.available_backends() if backends.BACKENDS[b].supports(device)]
    return ["torch", "torch.compile", *ours]


def make_function(provider: str, op: str, shape: tuple[int, int], device: str) -> Callable:
    if provider == "torch":
        return _torch_function(op, shape, device)
    if provider == "torch.compile":
        torch._dynamo.reset()  # a fresh compile per case: no recompile limit reached
        return torch.compile(_torch_function(op, shape, device), fullgraph=True, dynamic=False)
    return _stablekernels_function(op, provider.removeprefix("sk-"))


def make_call(fn: Callable, op: str, direction: str, x: torch.Tensor, t: torch.Tensor):
    """One call of the case: the forward without autograd, or forward and backward."""
    if direction == "forward":

        def forward():
            with torch.no_grad():
                return fn(x, t)

        return forward
    leaf = x.detach().requires_grad_()
    grad = None

    def forward_backward():
        nonlocal grad
        out = fn(leaf, t)
        if grad is None:
            grad = torch.randn_like(out)
        out.backward(grad)
        leaf.grad = None

    return forward_backward


@dataclass
class Row:
    op: str
    direction: str
    shape: str
    provider: str
    aten_ops: int | None = None
    launches: int | None = None
    sk_kernels: int | None = None
    syncs: int | None = None
    us_per_call: float = float("nan")
    calls_timed: int = 0
    error: str = ""
    leaf_ops: dict = field(default_factory=dict)


def _is_kernel(name: str) -> bool:
    return name.startswith("stablekernels::_fused")


def _is_launch(name: str) -> bool:
    """A leaf that runs a kernel over data: an extension kernel, or an aten op that is not a
    view, an allocation or a read-back. (A stablekernels op seen as a leaf is the entry of
    an op whose kernels run outside its profiler scope: counted as a dispatch only.)"""
    if name.startswith("stablekernels::"):
        return _is_kernel(name)
    return name not in NOT_LAUNCHES


def _inside_kernel(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if _is_kernel(parent.name):
            return True
        parent = parent.cpu_parent
    return False


def count_ops(call: Callable, row: Row) -> None:
    """Fill the row's counts from one profiled call. An extension kernel op is one leaf (the
    output allocation it makes inside is its own business, not a dispatch of the caller)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    names = []
    for event in prof.events():
        name = event.name
        if not name.startswith(("aten::", "stablekernels::")) or _inside_kernel(event):
            continue
        children = [c.name for c in event.cpu_children]
        if not _is_kernel(name) and any(
            c.startswith(("aten::", "stablekernels::")) for c in children
        ):
            continue
        names.append(name)
    row.aten_ops = len(names)
    row.launches = sum(_is_launch(n) for n in names)
    row.sk_kernels = sum(_is_kernel(n) for n in names)
    row.syncs = sum(n in SYNCS for n in names)
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    row.leaf_ops = dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def time_interleaved(calls: list[Callable | None], rounds: int, seconds: float) -> list:
    """Microseconds per call of each callable: the best of ``rounds`` rounds, a round timing
    each callable in turn over as many calls as fill ``seconds``; (us, calls) pairs."""
    per_round = []
    for call in calls:  # calibrate: calls per round from one timed call
        if call is None:
            per_round.append(0)
            continue
        start = time.perf_counter()
        call()
        elapsed = max(time.perf_counter() - start, 1e-7)
        per_round.append(max(1, min(100_000, int(seconds / elapsed))))
    best = [float("inf")] * len(calls)
    for _ in range(rounds):
        for i, call in enumerate(calls):
            if call is None:
                continue
            start = time.perf_counter()
            for _ in range(per_round[i]):
                call()
            best[i] = min(best[i], (time.perf_counter() - start) / per_round[i])
    return [(b * 1e6, n) for b, n in zip(best, per_round, strict=True)]


def run_case(op, direction, shape, names, device, rounds, seconds) -> list[Row]:
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen) * 4).to(device)
    t = torch.randint(0, shape[1], (shape[0],), generator=gen).to(device)
    rows, calls = [], []
    for name in names:
        row = Row(op, direction, f"{shape[0]}x{shape[1]}", name)
        try:
            call = make_call(make_function(name, op, shape, device), op, direction, x, t)
            for _ in range(3):  # warm-up (and torch.compile's compile)
                call()
            if name != "torch.compile":
                count_ops(call, row)
        except Exception as exc:  # an error is a result
            row.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
            call = None
        rows.append(row)
        calls.append(call)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    timed = [None if c is None else (lambda c=c: (c(), sync())) for c in calls]
    for row, (us, n) in zip(rows, time_interleaved(timed, rounds, seconds), strict=True):
        if n:
            row.us_per_call, row.calls_timed = us, n
    return rows


def _parse_shape(text: str) -> tuple[int, int]:
    rows, n = text.lower().split("x")
    return int(rows), int(n)


def table(rows: list[Row]) -> str:
    base = {(r.op, r.direction, r.shape): r.us_per_call for r in rows if r.provider == "torch"}
    header = ["op", "direction", "shape", "provider", "aten ops", "launches", "sk kernels",
              "syncs", "us/call", "x torch"]  # fmt: skip
    lines = [header]
    for r in rows:
        torch_us = base.get((r.op, r.direction, r.shape), float("nan"))

        def num(v):
            return "-" if v is None else str(v)

        lines.append([
            r.op, r.direction, r.shape, r.provider, num(r.aten_ops), num(r.launches),
            num(r.sk_kernels), num(r.syncs),
            r.error or f"{r.us_per_call:,.1f}",
            "" if r.error else f"{r.us_per_call / torch_us:.2f}",
        ])  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for i, line in enumerate(lines):
        out.append("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.overhead",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--directions", nargs="+", choices=DIRECTIONS, default=list(DIRECTIONS))
    parser.add_argument("--shapes", nargs="+", type=_parse_shape, default=list(SHAPES))
    parser.add_argument("--providers", nargs="+", help="default: every provider of the device")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.2, help="per provider and round")
    parser.add_argument("--out", help="output folder for results.csv, table.txt, command.txt")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = args.providers or providers(args.device)
    started = datetime.datetime.now(datetime.timezone.utc)
    cases = [(o, d, s) for s in args.shapes for o in args.ops for d in args.directions]
    rows: list[Row] = []
    for i, (op, direction, shape) in enumerate(cases, 1):
        print(f"[{i}/{len(cases)}] {op} {direction} {shape}", file=sys.stderr, flush=True)
        rows += run_case(op, direction, shape, names, args.device, args.rounds, args.seconds)
    text = table(rows)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
            writer.writeheader()
            for r in rows:
                writer.writerow({**asdict(r), "leaf_ops": " ".join(
                    f"{k.split('::')[1]}x{v}" for k, v in r.leaf_ops.items())})  # fmt: skip
        with open(os.path.join(args.out, "table.txt"), "w") as f:
            f.write(text + "\n")
        with open(os.path.join(args.out, "command.txt"), "w") as f:
            command = " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
            f.write(f"command: python -m benchmarks.overhead {command}\n")
            f.write(f"date: {started:%Y-%m-%d %H:%M UTC}\n")
            f.write(f"torch: {torch.__version__}, python {platform.python_version()}\n")
            f.write(f"cpu capability: {torch.backends.cpu.get_cpu_capability()}\n")
            f.write(
                f"threads: {torch.get_num_threads()}; rounds {args.rounds} x {args.seconds} s "
                "per provider, interleaved; best round reported\n"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
