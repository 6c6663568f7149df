"""The bandwidth model of the CUDA kernels on an H100, from their compiled sm_90 code.

    python tools/cuda_model.py --write   # rewrite docs/cuda_model.md
    python tools/cuda_model.py --check   # fail if a shape with n >= 1024 is estimated
                                         # below TARGET_TBS in flight

For each shape class (op, dtype, row length) the launch plan of csrc/cuda/softmax.cu and
cross_entropy.cu picks a kernel instantiation (the plan is replicated below; a plan naming an
instantiation that was not compiled is an error, so the two cannot drift apart silently).
From its registers (ptxas, via tools/cuda_sass.py) and block size come the blocks resident
per SM; times the bytes each thread has in flight (its loads, all issued before their first
use: checked by tools/cuda_sass.py) that gives the bytes in flight per SM, and Little's law
the bandwidth: bytes in flight per SM * SMS / LATENCY_NS, capped at the HBM roof. Assumes
enough rows to fill every SM.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "cuda_model.md")

# H100 SXM (sm_90).
SMS = 132
REGISTERS_PER_SM = 65536
THREADS_PER_SM = 2048
BLOCKS_PER_SM = 32
ROOF_TBS = 3.35  # HBM3, datasheet
LATENCY_NS = 680.0  # DRAM load latency under load, assumed
TARGET_TBS = 3.0  # the estimate every shape with n >= 1024 must reach

# The plan constants of csrc/cuda/softmax.cu and cross_entropy.cu.
MAX_ROW_THREADS = 512
BACKWARD_ITEMS = 4
STRIDED_THREADS = 256
MAP_THREADS, MAP_ITEMS = 256, 4
CE_TILE_ITEMS = 4
CE_REDUCE_THREADS = 512  # cross_entropy_loss_reduce_kernel's one block
ELEMENT_BYTES = {"float": 4, "bf16": 2, "fp16": 2, "double": 8}


def forward_items(dtype: str) -> int:
    return 4 if ELEMENT_BYTES[dtype] == 2 else 8


def vec(dtype: str) -> int:
    return 16 // ELEMENT_BYTES[dtype]


def block_threads(r: int) -> int:
    return 128 if r <= 32 else r


def row_threads(n: int, items: int, dtype: str) -> int:
    """The group size of the row kernels for aligned rows of n elements (0: split path)."""
    packs = math.ceil(n / vec(dtype))
    r = 4
    while r <= MAX_ROW_THREADS:
        if r * items >= packs:
            return r
        r *= 2
    return 0


@dataclasses.dataclass
class Launch:
    kernel: str  # instantiation, as tools/cuda_sass.py names it
    threads: int  # per block
    bytes_per_thread: int  # global loads in flight per thread
    exps: str  # exps per element
    note: str = ""


def plan(op: str, dtype: str, n: int) -> list[Launch]:
    """The kernels a contiguous (rows, n) input of `dtype` runs, for op in softmax,
    log_softmax, logsumexp, softmax_backward, log_softmax_backward, logsumexp_backward,
    cross_entropy, cross_entropy_backward (the row pieces and their map), cross_entropy_loss
    (the fused loss, "sum" or "mean": its row kernel and the reduction's one block; "none"
    runs the row kernel only), cross_entropy_loss_backward, softmax_strided."""
    t = dtype
    log = "true" if op.startswith("log_softmax") else "false"
    if op in ("softmax", "log_softmax", "logsumexp"):
        items = forward_items(t)
        r = row_threads(n, items, t)
        exps = "1" if op != "log_softmax" else "1 (for s')"
        if r:
            name = (
                f"softmax_rows_kernel<{t}, {t}, {r}, {items}, {log}>"
                if op != "logsumexp"
                else f"logsumexp_rows_kernel<{t}, {r}, {items}>"
            )
            return [Launch(name, block_threads(r), items * 16, exps)]
        launches = [
            Launch(f"row_parts_kernel<{t}, float>", MAX_ROW_THREADS, items * 16, "1"),
            Launch(f"merge_parts_kernel<{t}, float>", 256, 0, "per part", "one per row"),
        ]
        if op != "logsumexp":
            launches.append(
                Launch(
                    f"softmax_finish_kernel<{t}, {t}, {log}>",
                    MAX_ROW_THREADS,
                    items * 16,
                    "0" if log == "true" else "1",
                    "reads x again",
                )
            )
        return launches
    if op in ("softmax_backward", "log_softmax_backward"):
        r = row_threads(n, BACKWARD_ITEMS, t)
        exps = "1" if log == "true" else "0"
        if r:
            return [
                Launch(f"backward_rows_kernel<{t}, {t}, {r}, {BACKWARD_ITEMS}>",
                       block_threads(r), 2 * BACKWARD_ITEMS * 16, exps)
            ]  # fmt: skip
        return [
            Launch(f"backward_parts_kernel<{t}, float>", MAX_ROW_THREADS,
                   2 * BACKWARD_ITEMS * 16, "0"),
            Launch("sum_parts_kernel<float>", 256, 0, "0", "one per row"),
            Launch(f"backward_finish_kernel<{t}, {t}>", MAX_ROW_THREADS,
                   2 * BACKWARD_ITEMS * 16, exps, "reads grad and y again"),
        ]  # fmt: skip
    if op == "logsumexp_backward":
        return [Launch(f"logsumexp_backward_kernel<{t}>", MAP_THREADS, MAP_ITEMS * 16, "1")]
    if op in ("cross_entropy", "cross_entropy_loss"):
        threads = 128 if n <= 128 * CE_TILE_ITEMS * vec(t) else 512
        kernel = "cross_entropy_forward_kernel" if op == "cross_entropy" else f"{op}_forward_kernel"
        launches = [Launch(f"{kernel}<{t}, {threads}>", threads, CE_TILE_ITEMS * 16,
                           "1 + 1 per tile")]  # fmt: skip
        if op == "cross_entropy_loss":
            acc = "double" if t == "double" else "float"
            launches.append(
                Launch(f"cross_entropy_loss_reduce_kernel<{acc}>", CE_REDUCE_THREADS, 0, "0",
                       "sum, mean: one block adds the rows' totals (32 bytes a row)")
            )  # fmt: skip
        return launches
    if op in ("cross_entropy_backward", "cross_entropy_loss_backward"):
        return [Launch(f"{op}_kernel<{t}>", 256, CE_TILE_ITEMS * 16, "1")]
    if op == "softmax_strided":
        return [
            Launch(f"softmax_strided_kernel<{t}, {t}>", STRIDED_THREADS, 16,
                   "1 per pass (2 passes)", "reads x twice")
        ]  # fmt: skip
    raise ValueError(op)


SHAPES = (
    [
        (op, dtype, n)
        for op in (
            "softmax",
            "log_softmax",
            "logsumexp",
            "softmax_backward",
            "log_softmax_backward",
        )
        for dtype in ("float", "bf16")
        for n in (256, 1024, 4096, 16384, 65536, 262144)
    ]
    + [
        (op, dtype, n)
        for op in (
            "logsumexp_backward",
            "cross_entropy",
            "cross_entropy_backward",
            "cross_entropy_loss",
            "cross_entropy_loss_backward",
        )
        for dtype in ("float", "bf16")
        for n in (1024, 32000, 128256)
    ]
    + [("softmax_strided", dtype, 4096) for dtype in ("float", "bf16")]
)


@dataclasses.dataclass
class Estimate:
    op: str
    dtype: str
    n: int
    launch: Launch
    registers: int
    spill_bytes: int
    blocks_per_sm: int
    in_flight_kb: float  # per SM
    tbs: float


def estimate(records, op: str, dtype: str, n: int) -> list[Estimate]:
    by_name = {r.name: r for r in records}
    out = []
    for launch in plan(op, dtype, n):
        if launch.kernel not in by_name:
            raise KeyError(f"{launch.kernel} (plan of {op} {dtype} n={n}) was not compiled")
        rec = by_name[launch.kernel]
        regs_per_warp = math.ceil(rec.registers * 32 / 256) * 256
        warps = launch.threads // 32
        blocks = min(
            REGISTERS_PER_SM // (regs_per_warp * warps),
            THREADS_PER_SM // launch.threads,
            BLOCKS_PER_SM,
        )
        in_flight = blocks * launch.threads * launch.bytes_per_thread
        tbs = min(ROOF_TBS, in_flight * SMS / (LATENCY_NS * 1e-9) / 1e12)
        out.append(
            Estimate(op, dtype, n, launch, rec.registers, rec.spill_bytes, blocks,
                     in_flight / 1024, tbs)
        )  # fmt: skip
    return out


def all_estimates(records) -> list[Estimate]:
    return [e for shape in SHAPES for e in estimate(records, *shape)]


def problems(estimates: list[Estimate]) -> list[str]:
    """Kernels that move data (bytes in flight > 0) at n >= 1024 estimated below target."""
    return [
        f"{e.op} {e.dtype} n={e.n}: {e.launch.kernel} estimated {e.tbs:.2f} TB/s "
        f"({e.in_flight_kb:.0f} KiB in flight per SM) < {TARGET_TBS}"
        for e in estimates
        if e.n >= 1024 and e.launch.bytes_per_thread and e.tbs < TARGET_TBS
    ]


def write(estimates: list[Estimate]) -> None:
    lines = [
        "# CUDA kernels: the bandwidth model",
        "",
        f"Generated by `python tools/cuda_model.py --write` ({datetime.date.today()}), from "
        "the sm_90 code nvcc compiles (registers: ptxas; the checks on the code: "
        "`tools/cuda_sass.py`, run in CI). An estimate, not a measurement: GPU timings "
        "belong in `benchmarks/results/`.",
        "",
        "## The model",
        "",
        "A memory-bound kernel moves bytes at most at the rate its loads are in flight "
        f"(Little's law): bandwidth = bytes in flight per SM x {SMS} SMs / latency. With an "
        f"assumed loaded DRAM latency of {LATENCY_NS:.0f} ns, the H100's {ROOF_TBS} TB/s "
        f"(HBM3) needs {ROOF_TBS * 1e12 * LATENCY_NS * 1e-9 / SMS / 1024:.1f} KiB in "
        f"flight per SM, and {TARGET_TBS} TB/s needs "
        f"{TARGET_TBS * 1e12 * LATENCY_NS * 1e-9 / SMS / 1024:.1f} KiB.",
        "",
        "- **Loads in flight per thread**: each row kernel issues all of its loads (16-byte "
        "packs, padded at the row's ends) before the first exp; `tools/cuda_sass.py` fails "
        "CI when a forward row kernel's SASS has a global load after its first `MUFU.EX2` "
        "(per loop body). Forward: 8 packs (fp32, fp64) or 4 (bf16, fp16) per thread, 32 "
        "elements; backward: 4 packs of grad and 4 of y; cross-entropy: 4 packs per tile; "
        "strided kernels: 16 bytes per column per batch (scalar loads; ptxas may move the "
        "last load of a batch past the first exp).",
        "- **Threads per row** from the row length: the smallest power of two R (4 to 512) "
        "whose threads hold the row; R <= 32 puts 128 / R rows in a block of 128 threads, "
        "larger R one row per block of R. Longer rows (fp32 and bf16 beyond 16384 "
        "elements forward, 8192 and 16384 backward) split into pieces of one 512-thread "
        "block each: the pieces' states, one merge per row, and a second read of x.",
        "- **Resident blocks per SM** = min(65536 registers / (registers per warp, in units "
        "of 256, x warps), 2048 threads / block, 32); no kernel uses enough shared memory "
        "to limit it.",
        "- **Exps and divisions per element**: softmax and logsumexp forward one exp per "
        "element (the max first, then exp(x - m); CI fails on more `MUFU.EX2` than "
        "elements loaded), no division: one reciprocal per row (`rcp.approx` and a Newton "
        "step) and one multiply per element. log_softmax writes (x - m) - log1p(s'): its "
        "split path's second pass has no exp at all. Cross-entropy adds one exp per thread "
        "per tile whose max rises.",
        "- **No spills** on the fp32, bf16 and fp16 paths (CI fails on any; float64 paths "
        "may spill and are listed in `docs/gpu_resources.md`).",
        "",
        "What the estimate leaves out: the split path reads x (or grad and y) twice, so its "
        "useful bandwidth is 2/3 (forward) or 3/5 (backward) of the rate it moves bytes, "
        "unless the second read hits L2; strided rows (a dim other than the last) read x "
        "twice and take an exp in each pass; one block per 32 neighbouring columns runs "
        "the whole length of those rows, so a tensor with few of them (dim 0 of a "
        "(100000, 8) tensor: one block) uses few SMs. Rows shorter than a block's "
        "threads x 32 elements leave threads idle in the cross-entropy and logsumexp "
        'backward kernels (a block per row). The fused cross-entropy loss\'s "sum" and '
        '"mean" end in one block that adds the rows\' totals (32 bytes a row, a few '
        "microseconds per 100k rows): listed, not estimated.",
        "",
        "## Estimates per shape class",
        "",
        "Contiguous rows, enough of them to fill every SM; n elements per row (classes for "
        "cross-entropy; the strided row is the reduced dim).",
        "",
        "| op | dtype | n | kernel | threads / block | registers | spill bytes | blocks / SM "
        "| bytes in flight / thread | KiB in flight / SM | exps / element | estimate TB/s | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in estimates:
        tbs = f"{e.tbs:.2f}" if e.launch.bytes_per_thread else "-"
        lines.append(
            f"| {e.op} | {e.dtype} | {e.n} | `{e.launch.kernel}` | {e.launch.threads} | "
            f"{e.registers} | {e.spill_bytes} | {e.blocks_per_sm} | "
            f"{e.launch.bytes_per_thread} | {e.in_flight_kb:.0f} | {e.launch.exps} | {tbs} | "
            f"{e.launch.note} |"
        )
    lines.append("")
    with open(DOC, "w") as f:
        f.write("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true")
    mode.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    sys.path.insert(0, ROOT)
    from tools.cuda_sass import compiled_kernels

    estimates = all_estimates(compiled_kernels())
    if args.write:
        write(estimates)
    found = problems(estimates)
    for p in found:
        print(p)
    lowest = min(e.tbs for e in estimates if e.n >= 1024 and e.launch.bytes_per_thread)
    print(f"{len(estimates)} kernel estimates; lowest at n >= 1024: {lowest:.2f} TB/s")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
