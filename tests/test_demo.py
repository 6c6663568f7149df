"""``python -m stablekernels``: the demo runs, exits 0, and shows the naive failures beside
the stable values."""

from __future__ import annotations

import re
import subprocess
import sys


def test_demo_prints_naive_failures_beside_stable_values():
    run = subprocess.run(
        [sys.executable, "-m", "stablekernels", "--repeats", "3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    lines = {line.split("  ")[0]: line for line in run.stdout.splitlines()}
    assert lines["softmax([1000, 0])"].split()[2:6] == ["[nan,", "0]", "[1,", "0]"]
    assert "[nan, nan]" in lines["softmax([1000, 1000])"]
    assert lines["logsumexp([1000, 1000])"].split()[2] == "inf"
    row = lines["log_softmax([0, -20])[0]"].split()
    assert row[2:4] == ["0", "0"] and float(row[4]) < 0
    row = lines["logsumexp(70000 fp16 zeros)"].split()
    assert row[3:5] == ["inf", "inf"] and abs(float(row[5]) - 11.156) < 0.01
    assert "Backends on this machine" in run.stdout
    assert "torch.softmax" in run.stdout and "(us)" in run.stdout
    # The progress display went to stderr, one step per measured row.
    assert re.search(r"\[\s*1/\d+\]", run.stderr)
