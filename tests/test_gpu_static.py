"""The GPU kernels checked without a GPU: every Triton kernel variant the launchers use
(tools/triton_launches.py) compiled ahead of time for sm_80 and sm_90 by Triton's own
compiler, failing on a compile error, on a spill in a kernel for float32/bfloat16/float16
rows (float64 may spill), and on a cross-entropy kernel without its device-side target
check: ``python tools/gpu_resources.py --check``. (The CUDA sources: test_cuda_sources.py;
the table of both: docs/gpu_resources.md.)"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from .conftest import SUBPROCESS_TIMEOUT_S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _triton_compiles_for_nvidia() -> bool:
    return importlib.util.find_spec("triton") is not None and (
        importlib.util.find_spec("triton.backends.nvidia") is not None
    )


@pytest.mark.skipif(not _triton_compiles_for_nvidia(), reason="triton with its CUDA backend")
def test_every_triton_variant_compiles_for_sm80_and_sm90_without_spills():
    # The tool compiles in processes of its own, without TRITON_INTERPRET.
    run = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "gpu_resources.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-6000:]
    assert "variants compiled for sm_80, sm_90" in run.stdout, run.stdout
