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
    assert "roofs measured before each case" in run.stdout
    for name in ("results.csv", "results.json", "table.txt", "command.txt"):
        assert (out / name).is_file(), name
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
