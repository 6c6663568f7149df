"""Compile every GPU kernel for sm_80 and sm_90 without a GPU, and report its resources.

    python tools/gpu_resources.py --check   # Triton: compile every launched variant; fail
                                            # on a compile error or a spill (fp64 excepted)
    python tools/gpu_resources.py --write   # and CUDA; rewrite docs/gpu_resources.md

Triton: the launches of tools/triton_launches.py (every launcher over the block sizes,
dtypes and num_warps it uses) are compiled ahead of time by Triton itself (the kernel's
``warmup`` with a stand-in driver that names the target GPU; Triton's bundled ptxas), and
each cubin is read by Triton's bundled ``cuobjdump -res-usage``: registers, local memory
(a Triton kernel has no local arrays, so local bytes are spills) and shared memory. The
cross-entropy kernels must keep their device-side target check (``__assertfail`` in the
PTX). CUDA: every csrc/cuda/*.cu by nvcc with ``-Xptxas -v`` (registers, spill stores and
loads, stack, shared memory per instantiation). Needs triton, and nvcc for the CUDA part;
runs with TRITON_INTERPRET unset (the interpreter has no compiler).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import datetime
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = (80, 90)
TABLE = os.path.join(ROOT, "docs", "gpu_resources.md")
# Kernels whose compiled code must hold a device-side assert (the class-target check).
ASSERTING_KERNELS = ("_cross_entropy_fwd_kernel", "_cross_entropy_bwd_kernel")


@dataclasses.dataclass
class Compiled:
    kernel: str
    config: str  # pointer dtypes, constexprs and num_warps
    arch: int
    registers: int
    spill_bytes: int  # Triton: local + stack bytes; CUDA: spill stores
    shared_bytes: int
    fp64: bool  # computes in float64 (may spill)
    asserts: bool  # the compiled code holds a device-side assert


# ----------------------------------------------------------------------------------------
# Triton.


class _TargetDriver:
    """The part of a Triton driver that compiling needs: the target GPU (no device)."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return self.target.arch  # a cache key of the kernel's binder, one per target

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


def _describe(launch) -> str:
    import torch

    pointers = [str(a).replace("torch.", "") for a in launch.args if isinstance(a, torch.dtype)]
    options = ", ".join(f"{k}={getattr(v, 'name', v)}" for k, v in sorted(launch.options.items()))
    return f"({', '.join(pointers)}) {options}"


def _computes_in_float64(launch) -> bool:
    """The kernel's accumulation dtype (ACC, or the dtype of its first tensor: the merge
    kernels' part states) is float64."""
    import torch
    import triton.language as tl

    if "ACC" in launch.options:
        return launch.options["ACC"] == tl.float64
    return next(a for a in launch.args if isinstance(a, torch.dtype)) == torch.float64


def _cuobjdump() -> str:
    import triton.backends.nvidia as nvidia

    return os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")


def _resource_usage(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    usage = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {k: int(v) for k, v in usage.items()}


def triton_compiled(arch: int) -> list[Compiled]:
    """Every distinct variant the Triton launchers use, compiled for sm_<arch>."""
    from triton.runtime.driver import driver

    sys.path.insert(0, ROOT)
    from tools.triton_launches import launch_matrix

    launches = launch_matrix()
    driver.set_active(_TargetDriver(arch))
    compiled: dict[str, Compiled] = {}
    for launch in launches:
        kernel = launch.kernel.warmup(*launch.args, grid=launch.grid, **launch.options)
        if kernel.hash in compiled:
            continue
        usage = _resource_usage(kernel.asm["cubin"])
        compiled[kernel.hash] = Compiled(
            kernel=launch.name,
            config=_describe(launch),
            arch=arch,
            registers=usage["REG"],
            spill_bytes=usage.get("LOCAL", 0) + usage.get("STACK", 0),
            shared_bytes=max(usage.get("SHARED", 0), kernel.metadata.shared),
            fp64=_computes_in_float64(launch),
            asserts="__assertfail" in kernel.asm["ptx"],
        )
    return sorted(compiled.values(), key=lambda c: (c.kernel, c.config))


def _triton_all_archs() -> list[Compiled]:
    """triton_compiled for every arch, one process per arch (the compiles are CPU-bound)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {
        arch: subprocess.Popen(
            [sys.executable, __file__, "--triton-json", str(arch)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for arch in ARCHS
    }
    results: list[Compiled] = []
    for arch, proc in procs.items():
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"compiling the Triton kernels for sm_{arch} failed:\n{err[-8000:]}")
        results += [Compiled(**row) for row in json.loads(out)]
    return results


def triton_problems(compiled: list[Compiled]) -> list[str]:
    """What --check fails on: a spill outside float64, a cross-entropy kernel without its
    device-side assert."""
    problems = []
    for c in compiled:
        if c.spill_bytes and not c.fp64:
            problems.append(f"sm_{c.arch} {c.kernel} {c.config}: spills {c.spill_bytes} bytes")
        if c.kernel in ASSERTING_KERNELS and not c.asserts:
            problems.append(f"sm_{c.arch} {c.kernel} {c.config}: no device-side target check")
    names = {c.kernel for c in compiled}
    for name in ASSERTING_KERNELS:
        if name not in names:
            problems.append(f"{name} was not compiled")
    return problems


# ----------------------------------------------------------------------------------------
# CUDA.


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    candidate = os.path.join(home, "bin", "nvcc")
    return candidate if os.path.exists(candidate) else shutil.which("nvcc")


def _short_name(mangled: str) -> str:
    demangled = subprocess.run(
        ["c++filt", mangled], capture_output=True, text=True, check=True
    ).stdout.strip()
    name = re.sub(r"^void ", "", demangled)
    name = re.sub(r"stablekernels::cuda::detail::(\(anonymous namespace\)::)?", "", name)
    return name.split("(")[0].replace("__nv_bfloat16", "bf16").replace("__half", "fp16")


def cuda_compiled(arch: int) -> list[Compiled]:
    """Every kernel instantiation of csrc/cuda/*.cu for sm_<arch>, from ptxas -v."""
    nvcc = _nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (CUDA_HOME or PATH)")
    results = []
    for source in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))):
        with tempfile.TemporaryDirectory() as tmp:
            run = subprocess.run(
                [
                    nvcc, "-c", source, "-o", os.path.join(tmp, "k.o"), "-std=c++17", "-O3",
                    "-I", os.path.join(ROOT, "csrc", "include"),
                    f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v",
                ],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
        for block in run.stderr.split("Compiling entry function")[1:]:
            mangled = re.match(r"\s*'([^']+)'", block).group(1)
            used = re.search(r"Used (\d+) registers", block)
            spills = re.search(r"(\d+) bytes spill stores", block)
            smem = re.search(r"(\d+) bytes smem", block)
            name = _short_name(mangled)
            results.append(
                Compiled(
                    kernel=name.split("<")[0],
                    config=name,
                    arch=arch,
                    registers=int(used.group(1)),
                    spill_bytes=int(spills.group(1)) if spills else 0,
                    shared_bytes=int(smem.group(1)) if smem else 0,
                    fp64="double" in name,
                    asserts=False,
                )
            )
    return results


# ----------------------------------------------------------------------------------------
# The table.


def _summary(compiled: list[Compiled]) -> list[str]:
    lines = [
        "| kernel | variants | registers (max) sm_80 / sm_90 | spilling variants "
        "(fp64 / other) | max spill bytes | shared bytes (max) |",
        "|---|---|---|---|---|---|",
    ]
    by_kernel = collections.defaultdict(list)
    for c in compiled:
        by_kernel[c.kernel].append(c)
    for kernel, rows in sorted(by_kernel.items()):
        regs = " / ".join(str(max(r.registers for r in rows if r.arch == a)) for a in ARCHS)
        fp64_spills = sum(1 for r in rows if r.spill_bytes and r.fp64)
        other_spills = sum(1 for r in rows if r.spill_bytes and not r.fp64)
        variants = len({r.config for r in rows})
        lines.append(
            f"| `{kernel}` | {variants} | {regs} | {fp64_spills} / {other_spills} | "
            f"{max(r.spill_bytes for r in rows)} | {max(r.shared_bytes for r in rows)} |"
        )
    return lines


def _details(compiled: list[Compiled]) -> list[str]:
    lines = [
        "| kernel | variant | sm_80 registers / spill | sm_90 registers / spill | shared |",
        "|---|---|---|---|---|",
    ]
    rows = collections.defaultdict(dict)
    for c in compiled:
        rows[(c.kernel, c.config)][c.arch] = c
    for (kernel, config), per_arch in sorted(rows.items()):
        cells = [
            f"{per_arch[a].registers} / {per_arch[a].spill_bytes}" if a in per_arch else "-"
            for a in ARCHS
        ]
        shared = max(c.shared_bytes for c in per_arch.values())
        lines.append(f"| `{kernel}` | `{config}` | {cells[0]} | {cells[1]} | {shared} |")
    return lines


def write_table(triton_rows: list[Compiled], cuda_rows: list[Compiled]) -> None:
    import triton

    nvcc_version = (
        subprocess.run([_nvcc(), "--version"], capture_output=True, text=True)
        .stdout.strip()
        .splitlines()[-1]
    )
    text = [
        "# GPU kernel resources (compiled without a GPU)",
        "",
        "Generated by `python tools/gpu_resources.py --write` "
        f"({datetime.date.today().isoformat()}; Triton {triton.__version__}; {nvcc_version}).",
        "Registers per thread, spill bytes per thread and shared memory per block, for sm_80 "
        "(A100) and sm_90 (H100). CI (`tests/test_gpu_static.py`) compiles every Triton "
        "variant below for both and fails on a spill outside float64 and on a cross-entropy "
        "kernel without its device-side target check; `tests/test_cuda_sass.py` fails on a "
        "CUDA kernel spilling outside float64 (and checks their SASS against the bandwidth "
        "model of `docs/cuda_model.md`). float64 variants may spill (they hold twice the "
        "registers per element).",
        "",
        "A Triton variant is a distinct compilation: pointer dtypes, constexprs, num_warps "
        "and Triton's specialisation of integer arguments (== 1, divisible by 16), from the "
        "launches of `tools/triton_launches.py` (every launcher over block sizes 16 to 8192, "
        "the split path, every dtype it takes). Triton spill bytes are local plus stack "
        "memory from `cuobjdump -res-usage`; CUDA spill bytes are ptxas's spill stores.",
        "",
        "## Triton",
        "",
        *_summary(triton_rows),
        "",
        "## CUDA (csrc/cuda)",
        "",
        *_summary(cuda_rows),
        "",
        "## Every variant",
        "",
        "<details><summary>Triton</summary>",
        "",
        *_details(triton_rows),
        "",
        "</details>",
        "",
        "<details><summary>CUDA</summary>",
        "",
        *_details(cuda_rows),
        "",
        "</details>",
        "",
    ]
    with open(TABLE, "w") as f:
        f.write("\n".join(text))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="Triton compile and spill check")
    mode.add_argument("--write", action="store_true", help="also CUDA; rewrite the table")
    mode.add_argument("--triton-json", type=int, metavar="ARCH", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.triton_json:
        json.dump([dataclasses.asdict(c) for c in triton_compiled(args.triton_json)], sys.stdout)
        return 0
    triton_rows = _triton_all_archs()
    problems = triton_problems(triton_rows)
    variants = len({(c.kernel, c.config) for c in triton_rows})
    print(f"Triton: {variants} variants compiled for " + ", ".join(f"sm_{a}" for a in ARCHS))
    if args.write:
        with concurrent.futures.ThreadPoolExecutor(len(ARCHS)) as pool:
            cuda_rows = [c for rows in pool.map(cuda_compiled, ARCHS) for c in rows]
        write_table(triton_rows, cuda_rows)
        print(f"CUDA: {len(cuda_rows)} kernel instantiations; wrote {os.path.relpath(TABLE)}")
    for problem in problems:
        print("PROBLEM:", problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
