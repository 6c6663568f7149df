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
from .conftest import eps, lse_error, rel_error, softmax_condition
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


# ----------------------------------------------------------------------------------------
# The masked kernels (csrc/cuda/masked_softmax.cu): rows held whole up to CAPACITY elements
# (the register kernel's 8192), longer ones walked in tiles (the long kernel's 8192; smaller
# tiles here walk short rows in several).

CAPACITY = 8192
MASKED_CAP = 8  # bound, in eps of the dtype, on y's error per unit of 1 + |t - m|, and lse's


def twin_masked(lib, x, keep, add, scale, causal_offset, mode, capacity=CAPACITY, tile=8192):
    """(y, lse) of the twin for x (rows, n) and per-element keep (bool) / add masks, rows of
    one query block (query r % rows)."""
    x = x.contiguous()
    rows, n = x.shape
    y = torch.empty_like(x)
    lse = torch.empty(rows, dtype=torch.float64)
    keep_u8 = None if keep is None else keep.to(torch.uint8).contiguous()
    add = None if add is None else add.to(x.dtype).contiguous()
    name = f"sk_twin_masked_softmax_f{32 if x.dtype == torch.float32 else 64}"
    getattr(lib, name)(
        _ptr(x),
        None if keep_u8 is None else _ptr(keep_u8),
        None if add is None else _ptr(add),
        ctypes.c_double(scale), ctypes.c_int64(rows), ctypes.c_int64(n),
        ctypes.c_int(causal_offset is not None), ctypes.c_int64(rows),
        ctypes.c_int64(causal_offset or 0), ctypes.c_int64(capacity), ctypes.c_int64(tile),
        ctypes.c_int(mode), _ptr(y), _ptr(lse),
    )  # fmt: skip
    return y, lse


def masked_scores(x, keep, add, scale, causal_offset) -> torch.Tensor:
    """t in float64, rounded as the kernels round it (in x's dtype here: fp32 or fp64)."""
    t = x * torch.tensor(scale, dtype=x.dtype)
    if add is not None:
        t = t + add.to(x.dtype)
    t = t.double()
    if keep is not None:
        t = t.masked_fill(~keep, -math.inf)
    if causal_offset is not None:
        rows, n = x.shape
        j = torch.arange(n)
        i = torch.arange(rows)[:, None]
        t = t.masked_fill(j > i + causal_offset, -math.inf)
    return t


MASKED_CASES = [
    (n, dtype, mask, causal, capacity, tile)
    for dtype in (torch.float32, torch.float64)
    for mask in ("none", "bool", "additive")
    for causal in (None, 0, -3, 5)
    for n, capacity, tile in ((7, CAPACITY, 8192), (1000, CAPACITY, 8192), (1000, 64, 96),
                              (20000, CAPACITY, 8192))
]  # fmt: skip


@pytest.mark.parametrize(
    "case",
    MASKED_CASES,
    ids=lambda c: f"n{c[0]}-{str(c[1])[6:]}-{c[2]}-causal{c[3]}-cap{c[4]}-tile{c[5]}",
)
def test_twin_masked_is_within_the_bounds(twin, case):
    n, dtype, kind, causal, capacity, tile = case
    torch.manual_seed(n)
    rows = 6
    x = make_input((rows, n), dtype, 1e4 if dtype == torch.float64 else 0.0)
    keep = add = None
    if kind == "bool":
        keep = torch.rand(rows, n) < 0.7
        keep[2] = False  # a dead row
    elif kind == "additive":
        add = torch.randn(rows, n, dtype=dtype) * 3
        add[1, ::2] = -math.inf
        add[3] = -math.inf  # a dead row
    scale = 0.125
    t = masked_scores(x, keep, add, scale, causal)
    kept = t > -math.inf
    live = kept.any(-1)
    e = eps(dtype)
    for mode in (0, 1, 2):
        y, lse = twin_masked(twin, x, keep, add, scale, causal, mode, capacity, tile)
        ref_lse = torch.where(live, reference.logsumexp(t.clamp(min=-1e300), -1), -math.inf)
        assert torch.equal(lse[~live], ref_lse[~live])
        assert lse_error(lse[live], ref_lse[live]) <= MASKED_CAP * e
        if mode == 2:
            continue
        log = mode == 1
        dropped = -math.inf if log else 0.0
        assert (y[~kept] == dropped).all()
        tl = t[live]
        name = "log_softmax" if log else "softmax"
        ref = getattr(reference, name)(tl.clamp(min=-1e300), -1)
        cond = None if log else softmax_condition(tl.clamp(min=-1e300), -1)
        k = kept[live]
        err = rel_error(y[live][k], ref[k], None if cond is None else cond[k])
        assert err <= MASKED_CAP * e, f"{name}: {err:.3g} > {MASKED_CAP} eps"


MASKED_SPECIAL = [
    ([1.0, math.nan, 2.0, 3.0], math.nan),
    ([1.0, math.inf, 2.0, 3.0], math.inf),
    ([-math.inf, -math.inf, -math.inf, -math.inf], -math.inf),
]


@pytest.mark.parametrize("capacity", [CAPACITY, 2])
@pytest.mark.parametrize("row, want_lse", MASKED_SPECIAL, ids=str)
def test_twin_masked_special_rows(twin, row, want_lse, capacity):
    """NaN and +inf rows: y NaN throughout, past the causal limit too; lse NaN / +inf. A dead
    row: y 0 / -inf throughout, lse -inf (not torch's NaN)."""
    x = torch.tensor([row], dtype=torch.float32)
    for causal in (None, 2):
        for mode in (0, 1):
            y, lse = twin_masked(twin, x, None, None, 1.0, causal, mode, capacity, 2)
            torch.testing.assert_close(
                lse, torch.tensor([want_lse], dtype=torch.float64), equal_nan=True
            )
            if math.isnan(want_lse) or want_lse == math.inf:
                assert y.isnan().all(), y
            else:
                assert (y == (-math.inf if mode == 1 else 0.0)).all(), y


def test_twin_masked_dead_rows_from_the_causal_limit(twin):
    # Offset -rows: no row keeps an element (L = 0 everywhere; nothing is read).
    x = torch.randn(4, 9)
    for mode in (0, 1):
        y, lse = twin_masked(twin, x, None, None, 1.0, -4, mode)
        assert (lse == -math.inf).all()
        assert (y == (-math.inf if mode == 1 else 0.0)).all()


def twin_masked_backward(lib, grad, y, lse, scale, log):
    rows, n = y.shape
    dx = torch.empty_like(y)
    name = f"sk_twin_masked_softmax_backward_f{32 if y.dtype == torch.float32 else 64}"
    getattr(lib, name)(
        _ptr(grad.contiguous()), _ptr(y), _ptr(lse), ctypes.c_double(scale),
        ctypes.c_int64(rows), ctypes.c_int64(n), ctypes.c_int(int(log)), _ptr(dx),
    )  # fmt: skip
    return dx


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("scale", [1.0, 0.125, -3.0])
def test_twin_masked_backward_scale_and_dead_rows(twin, dtype, log, scale):
    """The masked backward's arithmetic (masked_softmax.cu's backward kernels): within the
    bound of the sum's and the values' roundings of the float64 formula, scale applied; 0 on
    dead rows (lse -inf; y 0 / -inf there) and at dropped log_softmax elements."""
    g = torch.Generator().manual_seed(0)
    rows, n = 6, 1000
    x = torch.randn(rows, n, generator=g, dtype=torch.float64) * 3
    keep = torch.rand(rows, n, generator=g) > 0.4
    keep[2] = False  # a dead row
    y, lse = twin_masked(twin, x.to(dtype), keep, None, 1.0, None, int(log))
    assert lse[2] == -math.inf and not (lse[[0, 1, 3, 4, 5]] == -math.inf).any()
    grad = torch.randn(rows, n, generator=g, dtype=torch.float64).to(dtype)
    dx = twin_masked_backward(twin, grad, y, lse, scale, log)
    gd, yd = grad.double(), y.double()
    if log:
        expected = gd - yd.exp() * gd.sum(-1, keepdim=True)
        size = gd.abs() + yd.exp() * gd.abs().sum(-1, keepdim=True)
        expected = expected.masked_fill(yd == -math.inf, 0.0)
    else:
        expected = yd * (gd - (gd * yd).sum(-1, keepdim=True))
        size = yd.abs() * (gd.abs() + (gd * yd).abs().sum(-1, keepdim=True))
    expected = (expected * scale).masked_fill((lse == -math.inf)[:, None], 0.0)
    err = (dx.double() - expected).abs()
    assert (err <= 16 * eps(dtype) * (expected.abs() + abs(scale) * size)).all()
    assert dx[2].eq(0).all() and not dx[2].signbit().any()
    if log:
        assert dx[~keep].eq(0).all()


# ----------------------------------------------------------------------------------------
# The fused cross-entropy loss (csrc/cuda/cross_entropy.cu): the walk in tiles per thread,
# the block's tree of states, the epilogue and the one-block reduction of
# stablekernels/cross_entropy_rows.h, and the backward's map; held to the bounds the loss's
# tests hold every backend to (tests/test_cross_entropy.py: TOL) against float64.

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
IGNORE = -100


def twin_cross_entropy(lib, x, target, weight, e, z, reduction):
    """(loss, lse, counts) of the twin; counts as the CUDA kernels write it (NaN before, so
    an element left unwritten shows)."""
    x = x.contiguous()
    rows, classes = x.shape
    loss = torch.empty(rows if reduction == "none" else (), dtype=x.dtype)
    lse = torch.empty(rows, dtype=torch.float64)
    counts = torch.full((3,), math.nan, dtype=torch.float64)
    target = target.contiguous()
    weight = None if weight is None else weight.to(x.dtype).contiguous()
    name = f"sk_twin_cross_entropy_loss_f{32 if x.dtype == torch.float32 else 64}"
    getattr(lib, name)(
        _ptr(x), _ptr(target), None if weight is None else _ptr(weight),
        ctypes.c_int64(rows), ctypes.c_int64(classes), ctypes.c_int64(IGNORE),
        ctypes.c_double(e), ctypes.c_double(z), ctypes.c_int(REDUCTIONS[reduction]),
        _ptr(loss), _ptr(lse), _ptr(counts),
    )  # fmt: skip
    return loss, lse, counts


def twin_cross_entropy_backward(lib, grad, grad_lse, x, target, weight, lse, counts, e, z, red):
    x = x.contiguous()
    rows, classes = x.shape
    dx = torch.empty_like(x)
    grad = grad.to(x.dtype).contiguous()
    weight = None if weight is None else weight.to(x.dtype).contiguous()
    name = f"sk_twin_cross_entropy_loss_backward_f{32 if x.dtype == torch.float32 else 64}"
    getattr(lib, name)(
        _ptr(grad), ctypes.c_int64(1 if red == "none" else 0),
        None if grad_lse is None else _ptr(grad_lse), _ptr(x), _ptr(target.contiguous()),
        None if weight is None else _ptr(weight), _ptr(lse), _ptr(counts),
        ctypes.c_int64(rows), ctypes.c_int64(classes), ctypes.c_int64(IGNORE),
        ctypes.c_double(e), ctypes.c_double(z), ctypes.c_int(REDUCTIONS[red]), _ptr(dx),
    )  # fmt: skip
    return dx


def reference_cross_entropy(x, target, weight, e, z, reduction):
    """(loss, lse) in float64 (docs/design.md 1.8): torch's cross-entropy plus z lse^2 per
    counted row, "mean" dividing the ce terms by the counted weights and the z terms by the
    counted rows."""
    w = None if weight is None else weight.double()
    ce = torch.nn.functional.cross_entropy(
        x, target, w, ignore_index=IGNORE, label_smoothing=e, reduction="none"
    )
    lse = torch.logsumexp(x, -1)
    counted = target != IGNORE
    z_rows = torch.where(counted, z * lse * lse, 0.0)
    if reduction == "none":
        return ce + z_rows, lse
    if reduction == "sum":
        return (ce + z_rows).sum(), lse
    w_t = torch.ones(len(target), dtype=x.dtype) if w is None else w[target.clamp(min=0)]
    return ce.sum() / w_t[counted].sum() + z_rows.sum() / counted.sum(), lse


# (rows, classes): 128 threads, a tile of them exactly, 512 threads for one tile, several
# tiles; the reduction's threads take several rows each at 1100 rows.
CE_SHAPES = [(1100, 7), (40, 2048), (9, 2049), (4, 40000)]
CE_OPTIONS = [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-3), (0.2, 1e-3)]


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("options", CE_OPTIONS, ids=lambda o: f"e{o[0]:g}-z{o[1]:g}")
@pytest.mark.parametrize("shape", CE_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_twin_cross_entropy_is_within_the_bounds(twin, dtype, shape, options, weighted):
    from .test_cross_entropy import TOL

    rows, classes = shape
    e, z = options
    rtol, atol = TOL[dtype]
    for offset in OFFSETS:
        torch.manual_seed(rows + classes)
        x = make_input(shape, dtype, offset)
        target = torch.randint(0, classes, (rows,))
        target[1::5] = IGNORE
        weight = torch.rand(classes, dtype=torch.float64).to(dtype) + 0.5 if weighted else None
        grad_lse = torch.randn(rows, dtype=torch.float64)
        for reduction in REDUCTIONS:
            loss, lse, counts = twin_cross_entropy(twin, x, target, weight, e, z, reduction)
            x64 = x.double().requires_grad_()
            ref, ref_lse = reference_cross_entropy(x64, target, weight, e, z, reduction)
            scale = max(1.0, ref.detach().abs().max().item())
            torch.testing.assert_close(loss.double(), ref.detach(), rtol=rtol, atol=atol * scale)
            torch.testing.assert_close(lse, ref_lse.detach(), rtol=rtol, atol=0)
            if e:
                total = classes if weight is None else weight.double().sum().item()
                assert abs(counts[2].item() - total) <= rtol * total
            else:
                assert counts[2].item() == 0.0  # not formed: the backward never reads it
            if reduction == "none":
                assert (counts[:2] == 0).all()  # the rows are not counted
            grad = torch.randn(ref.shape, dtype=torch.float64)
            for g_lse in (None, grad_lse):
                dx = twin_cross_entropy_backward(
                    twin, grad, g_lse, x, target, weight, lse, counts, e, z, reduction
                )
                total = (ref * grad).sum()
                if g_lse is not None:
                    total = total + (ref_lse * g_lse).sum()
                (ref_dx,) = torch.autograd.grad(total, x64, retain_graph=True)
                # The float64 lse is rounded once at its size, and enters every exponent.
                shift = 4 * eps(torch.float64) * abs(offset)
                bound = (atol * 4 + shift) * ref_dx.abs().max().item()
                torch.testing.assert_close(dx.double(), ref_dx, rtol=rtol * 4 + shift, atol=bound)


@pytest.mark.parametrize("e", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_twin_cross_entropy_special_rows_are_torchs(twin, e, reduction):
    """All -inf, a +inf, a NaN: NaN; a -inf logit with smoothing: +inf (torch's smooth term);
    an ignored row: 0 whatever its logits."""
    inf, nan = math.inf, math.nan
    x = torch.tensor(
        [
            [-inf, -inf, -inf, -inf],
            [1.0, inf, 2.0, 0.0],
            [1.0, nan, 2.0, 0.0],
            [-inf, 0.0, 3.0, 1.0],
            [nan, inf, -inf, 0.0],
            [0.5, 0.25, 2.0, 1.0],
        ]
    )
    target = torch.tensor([0, 1, 2, 2, IGNORE, 3])
    for rows in ([0], [1], [2], [3], [4], [5], [3, 4, 5]):
        xs, ts = x[rows], target[rows]
        loss, _, _ = twin_cross_entropy(twin, xs, ts, None, e, 0.0, reduction)
        ref = torch.nn.functional.cross_entropy(
            xs.double(), ts, ignore_index=IGNORE, label_smoothing=e, reduction=reduction
        )
        torch.testing.assert_close(loss.double(), ref, equal_nan=True, rtol=1e-6, atol=0)
