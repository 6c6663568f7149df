"""A smoke run of the benchmark suite, so that it cannot silently rot: the runner on two tiny
shapes writes its table, CSV, JSON, record and plots, measures every provider, and marks
the naive formula incorrect on the large-magnitude rows; the pytest-benchmark suite
collects."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytest.importorskip("matplotlib")


def test_runner_smoke(tmp_path):
    out = tmp_path / "bench"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--smoke",
            "--device",
            "cpu",
            "--repeats",
            "3",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "roofs timed beside each case" in run.stdout
    for name in ("results.csv", "results.json", "table.txt", "command.txt"):
        assert (out / name).is_file(), name
    assert "allocator: " in (out / "command.txt").read_text()
    assert len(list((out / "plots").glob("*.png"))) == 8  # 4 ops x 2 directions x fp32

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    providers = {r["provider"] for r in rows}
    assert {"torch", "torch.compile", "naive", "sk-torch"} <= providers
    assert {r["op"] for r in rows} == {"softmax", "log_softmax", "logsumexp", "cross_entropy"}
    for r in rows:
        assert not r["note"].startswith("error"), r
        assert float(r["median_us"]) > 0 and float(r["gbs"]) > 0
        assert 0 < float(r["roof_fraction"]) and float(r["roof_gbs"]) > 0
        if r["provider"] == "naive":
            assert r["correct"] == "False" and ("NaN" in r["note"] or "inf" in r["note"]), r
        else:
            assert r["correct"] == "True", r
    with open(out / "results.json") as f:
        data = json.load(f)
    assert data["roofs_gbs"]["copy"] > 0 and len(data["rows"]) == len(rows)
    # one per case: 3 ops x 2 directions x 2 shapes, and cross-entropy's 2 directions
    assert len(data["roofs_gbs"]["measured"]) == 14
    assert "python -m benchmarks --smoke" in (out / "command.txt").read_text()


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
        timeout=300,
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


def test_runner_pins_the_cpu_allocator():
    """In a child process (mallopt changes the process for good): glibc accepts the policy
    and the runner says what it did."""
    code = "from benchmarks.runner import steady_cpu_allocator; print(steady_cpu_allocator())"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    if "no glibc" in out:
        pytest.skip("not a glibc system")
    assert "pinned at 32 MiB" in out, out
