"""A smoke run of the benchmark suite, so that it cannot silently rot: the runner on two tiny
shapes writes its table, CSV, JSON, record and plots, measures every provider, and marks
the naive formula incorrect on the large-magnitude rows; the pytest-benchmark suite
collects."""

from __future__ import annotations

import csv
import ctypes
import ctypes.util
import json
import os
import shlex
import subprocess
import sys

import pytest
import torch

import stablekernels as sk

from .conftest import SUBPROCESS_TIMEOUT_S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytest.importorskip("matplotlib")


def _csv_rows(run: subprocess.CompletedProcess, out) -> list[dict]:
    """The rows of ``out``/results.csv written by a benchmark run that must have succeeded."""
    assert run.returncode == 0, run.stderr[-3000:]
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


def _benchmarks(*args: str, module: str = "benchmarks") -> subprocess.CompletedProcess:
    """``python -m <module> *args`` from the repository root (the runner by default)."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )


def test_runner_smoke(tmp_path):
    """Every provider but torch.compile (whose compiles would be most of the run) on the
    smoke set; torch.compile on one case: test_runner_smoke_compiles."""
    from benchmarks.providers import all_providers

    out = tmp_path / "bench"
    providers = [p.name for p in all_providers("cpu") if p.name != "torch.compile"]
    args = ["--smoke", "--device", "cpu", "--repeats", "3", "--providers", *providers]
    run = _benchmarks(*args, "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    for name in ("results.csv", "results.json", "table.txt", "command.txt"):
        assert (out / name).is_file(), name
    assert len(list((out / "plots").glob("*.png"))) == 8  # 4 ops x 2 directions x fp32

    rows = _csv_rows(run, out)
    providers = {r["provider"] for r in rows}
    assert {"torch", "naive", "sk-torch"} <= providers
    assert {r["op"] for r in rows} == {"softmax", "log_softmax", "logsumexp", "cross_entropy"}
    for r in rows:
        assert not r["note"].startswith("error"), r
        assert float(r["median_us"]) > 0 and float(r["gbs"]) > 0
        assert 0 < float(r["roof_fraction"]) and float(r["roof_gbs"]) > 0
        if r["provider"] == "naive":
            # incorrect, and for the reason check() gives first: non-finite values
            assert r["correct"] == "False" and r["note"].split()[0] in ("NaN", "inf"), r
        else:
            assert r["correct"] == "True", r
    with open(out / "results.json") as f:
        data = json.load(f)
    assert data["roofs_gbs"]["copy"] > 0 and len(data["rows"]) == len(rows)
    assert [(r["op"], r["provider"]) for r in data["rows"]] == [
        (r["op"], r["provider"]) for r in rows
    ]
    # one per case: 3 ops x 2 directions x 2 shapes, and cross-entropy's 2 directions
    assert len(data["roofs_gbs"]["measured"]) == 14
    meta = data["meta"]
    assert meta["allocator"], meta  # the allocator policy is recorded with the results
    assert "THP_MEM_ALLOC_ENABLE=1 for every provider" in meta["allocator"], meta
    assert shlex.split(meta["command"]) == ["python", "-m", "benchmarks", *args, "--out", str(out)]
    # Rows reach results.csv as each case finishes, and the run says how far it is.
    assert "14 cases" in run.stderr and "left" in run.stderr, run.stderr[-2000:]
    assert "peak resident memory" in meta


def test_runner_smoke_compiles(tmp_path):
    """torch.compile as a provider: compiled once, timed, checked, beside torch eager."""
    out = tmp_path / "bench"
    run = _benchmarks(
        "--smoke", "--device", "cpu", "--repeats", "3", "--ops", "softmax", "--directions",
        "forward", "--providers", "torch", "torch.compile", "--no-plots", "--out", str(out),
    )  # fmt: skip
    rows = _csv_rows(run, out)
    assert sorted(r["provider"] for r in rows) == ["torch"] * 2 + ["torch.compile"] * 2, rows
    for r in rows:
        assert r["correct"] == "True" and float(r["median_us"]) > 0, r
        if r["provider"] == "torch.compile":
            assert float(r["speedup_vs_compile"]) == 1.0, r


# In a child process (the runner pins glibc's allocator for good): the runner on 18 cases
# of 4 MiB inputs, three providers, a 64 MiB rotation budget, the last-level cache claimed
# to be 512 MiB (so the rotation wants 64 copies, as on a machine that reports a large L3).
# Prints the peak resident memory before and after the run, and the resident memory after
# each case, in MiB.
_MEMORY_PROBE = """
import json, resource, torch
from benchmarks import cases, providers, runner
from stablekernels import _timing

_timing.steady_cpu_allocator()
runner.last_level_cache_bytes = lambda: 512 * 2**20
chosen = [p for p in providers.all_providers("cpu") if p.name in ("torch", "naive", "sk-torch")]
todo = [cases.Case(op, d, (512, 2048), -1, torch.float32)
        for op in ("softmax", "log_softmax", "logsumexp") for d in cases.DIRECTIONS] * 3
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
runner.run(todo[:1], chosen, torch.device("cpu"), repeats=1, warmup=0, max_seconds=0.01)
before, after_case = peak(), []
runner.run(todo, chosen, torch.device("cpu"), repeats=2, warmup=0, max_seconds=0.01,
           rotation_budget=64 * 2**20,
           on_case_done=lambda rows: after_case.append(runner.resident_bytes() / 2**20))
print(json.dumps({"before": before, "after": peak(), "cases": after_case}))
"""


def test_runner_memory_is_bounded_per_case():
    """The runner's resident memory is bounded by one case (its rotation budget, the roof
    buffers, the providers' outputs), not by the number of rows: measured with the
    process's own peak RSS. Before the rotation was shared and budgeted, the same run
    held 64 copies per provider: 3 x 64 x 4 MiB = 768 MiB for each forward case."""
    run = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout.splitlines()[-1])
    # The rotation (64 MiB) + two 128 MiB roof buffers + a case's inputs, reference and
    # outputs (a few 4-8 MiB tensors per provider): well under 448 MiB.
    assert seen["after"] - seen["before"] < 448, seen
    # Flat: the last six cases (the same as the first six) add nothing beyond noise.
    cases_ = seen["cases"]
    assert len(cases_) == 18 and max(cases_[12:]) - max(cases_[:6]) < 32, seen


def test_pytest_benchmark_suite_collects():
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "benchmarks",
            "--collect-only",
            "-q",
            "--bench-set",
            "smoke",
            "--bench-device",
            "cpu",
            "-p",
            "no:cacheprovider",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "test_op[softmax-forward-64x256-fp32-torch]" in run.stdout


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_backward_reference_is_judged_from_the_stored_output(op):
    """The correctness column of a half-precision backward: the reference starts from the
    forward output rounded to the dtype (what every backward receives), so a kernel that is
    exact from there is marked correct; from the exact output it would be charged with
    rounding it could not avoid (log_softmax, 262144 columns: 1.4 tolerances)."""
    from benchmarks.cases import Case, check, make_grad, make_input, reference

    case = Case(op, "backward", (8, 262144), -1, torch.bfloat16)
    x, dy = make_input(case, "cpu"), make_grad(case, "cpu")
    fn = torch.softmax if op == "softmax" else torch.log_softmax
    y = fn(x.double(), -1).to(torch.bfloat16)  # a correctly rounded forward output
    backward = torch._softmax_backward_data if op == "softmax" else torch._log_softmax_backward_data
    # The backward done in float64 from y, rounded once: the best a bf16 kernel can return.
    best = backward(dy.double(), y.double(), -1, torch.float64).to(torch.bfloat16)
    ref = reference(case, x, dy)
    assert check(case, best, ref)[0], check(case, best, ref)[1]
    # The reference is still the gradient: an output off by a few percent fails.
    assert not check(case, best.double() * 1.1 + 0.05, ref)[0]
    if op == "log_softmax":  # the exact-output reference would fail the best kernel here
        x64 = x.double().requires_grad_()
        (exact,) = torch.autograd.grad(fn(x64, -1), x64, dy.double())
        assert not check(case, best, exact)[0]


# In a child process (mallopt changes the process for good): after the runner's
# steady_cpu_allocator(), is a block of ``mib`` MiB served by a fresh mmap (True) or from
# the heap (False)? Counted with glibc's mallinfo2 (mapped blocks: hblks).
_ALLOCATOR_PROBE = """
import ctypes, ctypes.util, sys
from stablekernels._timing import steady_cpu_allocator

libc = ctypes.CDLL(ctypes.util.find_library("c"))
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks",
                "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "pin":
    steady_cpu_allocator()
def mapped(mib):
    before = libc.mallinfo2().hblks
    block = libc.malloc(mib * 2**20)
    fresh = libc.mallinfo2().hblks > before
    libc.free(block)
    return fresh
print(mapped(30), mapped(64))
"""


def _allocator_probe(mode: str) -> tuple[bool, bool]:
    out = subprocess.run(
        [sys.executable, "-c", _ALLOCATOR_PROBE, mode],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return out[0] == "True", out[1] == "True"


_THP_PROBE = """
import sys, torch, stablekernels as sk

def eligible(ptr):
    # the kernel's own word: THPeligible of the mapping that holds ptr (/proc/self/smaps)
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= ptr < hi
            elif inside and line.startswith("THPeligible:"):
                return line.split()[1] == "1"
    return None

x = torch.randn(1024, 2048)
outs = [torch.softmax(x, -1)] + [sk.softmax(x, -1, backend=b) for b in sk.available_backends()]
print(" ".join(str(eligible(o.data_ptr())) for o in outs))
"""


def test_huge_page_switch_covers_stablekernels_outputs():
    """The runner's page policy is torch's THP_MEM_ALLOC_ENABLE: with it, torch's allocator
    advises blocks of 2 MiB and more onto transparent huge pages, and the outputs of every
    stablekernels backend come from that allocator, so they get exactly what torch's own
    outputs get; without it, neither is advised."""
    mode = "/sys/kernel/mm/transparent_hugepage/enabled"
    if not os.path.exists(mode) or "[madvise]" not in open(mode).read():
        pytest.skip("transparent huge pages are not in madvise mode here")
    seen = {}
    for value in ("1", "0"):
        env = dict(os.environ, THP_MEM_ALLOC_ENABLE=value)
        run = subprocess.run(
            [sys.executable, "-c", _THP_PROBE], cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert run.returncode == 0, run.stderr[-2000:]
        seen[value] = run.stdout.split()
    assert len(seen["1"]) >= 2 and set(seen["1"]) == {"True"}, seen
    assert set(seen["0"]) == {"False"}, seen


def test_runner_pins_the_cpu_allocator():
    """With the policy pinned, a 30 MiB block comes from the heap (reused warm) and a
    64 MiB one from a fresh mmap; without it, glibc's default maps the 30 MiB block too."""
    libc_name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(libc_name) if libc_name else None
    if libc is None or not hasattr(libc, "mallopt") or not hasattr(libc, "mallinfo2"):
        pytest.skip("not a glibc (>= 2.33) system")
    default = _allocator_probe("default")
    if default != (True, True):
        pytest.skip(f"glibc's default already serves 30 MiB from the heap here: {default}")
    assert _allocator_probe("pin") == (False, True)


def test_linear_cross_entropy_benchmark_smoke(tmp_path):
    """The linear cross-entropy benchmark on a tiny shape: every provider named measures
    (each in its own process), the losses agree, the files are written."""
    out = tmp_path / "lce"
    providers = ["naive", "torch.lce", "sk-torch"]
    run = _benchmarks(
        "--shapes", "64x16x300", "--dtypes", "fp32", "--repeats", "1", "--providers", *providers,
        "--out", str(out), module="benchmarks.linear_cross_entropy",
    )  # fmt: skip
    rows = _csv_rows(run, out)
    assert [r["provider"] for r in rows] == providers
    assert all(not r["error"] and float(r["time_s"]) > 0 for r in rows), rows
    losses = [float(r["loss"]) for r in rows]
    assert max(losses) - min(losses) < 1e-4 * abs(losses[0]), losses
    assert (out / "table.txt").read_text().count("| 64 x 16 x 300 |") == len(providers)
    assert "fresh process" in (out / "command.txt").read_text()


def test_masked_softmax_benchmark_smoke(tmp_path):
    """The attention softmax benchmark on a tiny shape: every provider named measures both
    masks and directions, the files are written."""
    out = tmp_path / "masked"
    providers = ["torch", "torch._masked_softmax", "sk-torch"]
    run = _benchmarks(
        "--shapes", "2x2x16", "--dtypes", "fp32", "--repeats", "2", "--providers", *providers,
        "--out", str(out), module="benchmarks.masked_softmax",
    )  # fmt: skip
    rows = _csv_rows(run, out)
    assert len(rows) == 2 * 2 * len(providers)
    for r in rows:
        # torch._masked_softmax has no backward for these masks (torch's own error).
        broken = r["provider"] == "torch._masked_softmax" and r["direction"] != "forward"
        assert bool(r["error"]) == broken, r
        assert broken or float(r["time_ms"]) > 0
    assert "rounds" in (out / "command.txt").read_text()


def test_overhead_benchmark_smoke(tmp_path):
    """The per-call benchmark on a tiny shape: counts and times for every provider named,
    the files written, the extension's kernel counted once per softmax call."""
    out = tmp_path / "overhead"
    providers = ["torch", "sk-torch"] + (["sk-cpp"] if "cpp" in sk.available_backends() else [])
    run = _benchmarks(
        "--shapes", "4x16", "--ops", "softmax", "cross_entropy", "--rounds", "1", "--seconds",
        "0.01", "--providers", *providers, "--out", str(out), module="benchmarks.overhead",
    )  # fmt: skip
    rows = _csv_rows(run, out)
    assert len(rows) == 2 * 2 * len(providers)
    for r in rows:
        assert not r["error"] and float(r["us_per_call"]) > 0, r
        assert int(r["launches"]) >= 1 and int(r["aten_ops"]) >= int(r["launches"]), r
        if r["provider"] == "sk-cpp" and r["op"] == "softmax" and r["direction"] == "forward":
            assert (r["sk_kernels"], r["launches"]) == ("1", "1"), r
    assert "threads: 1" in (out / "command.txt").read_text()
    assert "us/call" in (out / "table.txt").read_text()
