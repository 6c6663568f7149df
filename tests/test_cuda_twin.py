"""The arithmetic of the CUDA row kernels, run on the CPU: csrc/tests/cuda_twin.cpp compiles
the kernels' header code (max first, one exp per element, the count of maxima, one
reciprocal per row, pieces merged as on the split path) into a small library, held here to
the accuracy tests' bounds against the float64 reference and to torch's special values.
The GPU's own exp and reciprocal differ from the host's by at most 2 and 1 ulp
(csrc/tests/cuda_twin.cpp); tests/test_gpu.py checks the kernels themselves on a GPU."""

from __future__ import annotations

import ctypes
import math
import os
import shutil
import subprocess

import pytest
import torch

from . import reference
from .conftest import lse_error, rel_error, softmax_condition
from .test_accuracy import OFFSETS, check_bound, make_input

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXX = shutil.which("g++") or shutil.which("c++")

pytestmark = pytest.mark.skipif(CXX is None, reason="a C++ compiler")

# Row lengths around the kernels' shapes: short rows, one group's capacity, several pieces.
LENGTHS = [1, 7, 64, 1000, 4097, 20000]
PIECE = 4096  # elements per piece of the emulated split path (the GPU's: 8192 or 16384)


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    out = tmp_path_factory.mktemp("twin") / "libsk_twin.so"
    subprocess.run(
        [
            CXX, "-O2", "-std=c++17", "-shared", "-fPIC", "-fno-fast-math",
            "-I", os.path.join(ROOT, "csrc", "include"),
            os.path.join(ROOT, "csrc", "tests", "cuda_twin.cpp"), "-o", str(out),
        ],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    lib = ctypes.CDLL(str(out))
    return lib


def _ptr(t: torch.Tensor):
    return ctypes.c_void_p(t.data_ptr())


def twin_softmax(lib, x: torch.Tensor, log: bool, piece: int) -> torch.Tensor:
    x = x.contiguous()
    y = torch.empty_like(x)
    name = "sk_twin_softmax_f32" if x.dtype == torch.float32 else "sk_twin_softmax_f64"
    rows, n = x.shape
    getattr(lib, name)(
        _ptr(x), _ptr(y), ctypes.c_int64(rows), ctypes.c_int64(n), ctypes.c_int64(piece),
        ctypes.c_int(int(log)),
    )  # fmt: skip
    return y


def twin_logsumexp(lib, x: torch.Tensor, piece: int) -> torch.Tensor:
    x = x.contiguous()
    rows, n = x.shape
    out = torch.empty(rows, dtype=torch.float64)
    name = "sk_twin_logsumexp_f32" if x.dtype == torch.float32 else "sk_twin_logsumexp_f64"
    getattr(lib, name)(
        _ptr(x), _ptr(out), ctypes.c_int64(rows), ctypes.c_int64(n), ctypes.c_int64(piece)
    )
    return out


CASES = [
    (n, dtype, offset, piece)
    for n in LENGTHS
    for dtype in (torch.float32, torch.float64)
    for offset in OFFSETS
    for piece in ((n, PIECE) if n > PIECE else (n,))
]


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"n{c[0]}-{str(c[1])[6:]}-off{c[2]:g}-piece{c[3]}"
)
def test_twin_is_within_the_accuracy_bounds(twin, case):
    n, dtype, offset, piece = case
    torch.manual_seed(n)
    x = make_input((3, n), dtype, offset)
    cond = softmax_condition(x, -1)
    for log, name in ((False, "softmax"), (True, "log_softmax")):
        ours = twin_softmax(twin, x, log, piece)
        ref = getattr(reference, name)(x, -1)
        theirs = getattr(torch, name)(x, -1)
        c = None if log else cond
        check_bound(rel_error(ours, ref, c), rel_error(theirs, ref, c), dtype)
    lse = twin_logsumexp(twin, x, piece)
    ref = reference.logsumexp(x, -1)
    check_bound(lse_error(lse, ref), lse_error(torch.logsumexp(x, -1).double(), ref), dtype)


def test_twin_keeps_tiny_log_probabilities(twin):
    # The max term is counted, not summed: log_softmax([0, -20])[0] = -log1p(e^-20).
    x = torch.tensor([[0.0, -20.0]])
    got = twin_softmax(twin, x, True, 2)[0, 0].item()
    want = -math.log1p(math.exp(-20.0))
    assert abs(got - want) <= 2 * abs(want) * torch.finfo(torch.float32).eps


SPECIAL_ROWS = [
    [-math.inf, -math.inf, -math.inf],
    [1.0, math.inf, 2.0],
    [math.inf, math.inf, 0.0],
    [1.0, math.nan, 2.0],
    [math.nan, math.nan, math.nan],
    [-math.inf, math.nan, -math.inf],
    [math.inf, math.nan, 0.0],
    [-math.inf, 0.0, 3.0],
    [2.0, 2.0, 2.0],
]


@pytest.mark.parametrize("piece", [1, 2, 3])
@pytest.mark.parametrize("row", SPECIAL_ROWS, ids=str)
def test_twin_special_values_are_torchs(twin, row, piece):
    x = torch.tensor([row], dtype=torch.float32)
    for log, fn in ((False, torch.softmax), (True, torch.log_softmax)):
        got = twin_softmax(twin, x, log, piece)
        torch.testing.assert_close(got, fn(x, -1), equal_nan=True, rtol=1e-6, atol=0)
    torch.testing.assert_close(
        twin_logsumexp(twin, x, piece),
        torch.logsumexp(x.double(), -1),
        equal_nan=True,
        rtol=1e-6,
        atol=0,
    )
