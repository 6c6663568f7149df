"""The Triton masked-softmax kernel, called directly (``_triton_masked_softmax``), against a
float64 reference: softmax, log_softmax and statistics-only modes; bool and additive masks
read broadcast through their strides ((B, 1, 1, S) key padding, (1, 1, S, S), (B, H, S, 1),
full); causal limits with offsets, square and rectangular; scale; dead (fully masked) rows,
NaN and +inf rows; rows long enough for the split path, with causal limits around its chunk
and tile edges. Runs on CPU tensors under the Triton interpreter (on a GPU machine, with
CUDA tensors).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from stablekernels import backends
from stablekernels._numerics import accumulation_dtype

from . import reference
from .conftest import eps, lse_error, rel_error

pytestmark = pytest.mark.skipif(
    not (
        backends.BACKENDS["triton"].supports("cpu") or backends.BACKENDS["triton"].supports("cuda")
    ),
    reason="the triton backend is unavailable (triton missing, or no GPU and no TRITON_INTERPRET)",
)

DEVICE = "cpu" if backends.BACKENDS["triton"].supports("cpu") else "cuda"
INF = float("inf")
# Outright bound on the relative error of y (softmax: per unit of |t - m| + 1, as in
# test_accuracy.py) and on the lse error, in units of eps of the output / accumulation dtype.
CAP = 8


def op(x, mask, scale, causal_offset, dtype, mode):
    from stablekernels.backends import triton  # noqa: F401  (registers the triton_ops)

    return torch.ops.stablekernels._triton_masked_softmax(
        x, mask, scale, causal_offset, dtype, mode
    )


def skip_unsupported(dtype: torch.dtype) -> None:
    if dtype == torch.bfloat16 and backends.TRITON_INTERPRETER:
        pytest.skip("bfloat16 under the Triton interpreter: numpy has no bfloat16 (runs on GPU)")


def scores(x, mask, scale, causal_offset, dtype) -> torch.Tensor:
    """t of the contract in float64: scale * x (+ mask) rounded as the kernel rounds them (in
    the accumulation dtype), dropped elements -inf."""
    acc = accumulation_dtype(x.dtype, dtype)
    t = x.to(acc) * torch.tensor(scale, dtype=acc)
    if mask is not None and mask.dtype != torch.bool:
        t = t + mask
    t = t.double()
    if mask is not None and mask.dtype == torch.bool:
        t = t.masked_fill(~mask, -INF)
    if causal_offset is not None:
        n = x.shape[-1]
        rows_q = x.shape[-2] if x.dim() >= 2 else 1
        i = torch.arange(rows_q, device=x.device)[:, None]
        j = torch.arange(n, device=x.device)[None, :]
        drop = j > i + causal_offset
        t = t.masked_fill(drop if x.dim() >= 2 else drop[0], -INF)
    return t


def reference_values(t: torch.Tensor):
    """(softmax, log_softmax, lse) of float64 scores along the last dim, in extended precision
    (tests/reference.py), on the CPU; dead rows 0 / -inf / -inf, rows with a NaN or a +inf
    max NaN (lse: NaN, or +inf without a NaN)."""
    t = t.cpu()
    m = t.amax(-1, keepdim=True)  # NaN where the row has a NaN
    with np.errstate(invalid="ignore"):
        softmax = reference.softmax(t, -1)
        log_softmax = reference.log_softmax(t, -1)
        lse = reference.logsumexp(t, -1, keepdim=True)
    dead, bad = m == -INF, m.isnan() | (m == INF)
    softmax = torch.where(dead, 0.0, torch.where(bad, math.nan, softmax))
    log_softmax = torch.where(dead, -INF, torch.where(bad, math.nan, log_softmax))
    lse = torch.where(dead | bad, m, lse)
    return softmax, log_softmax, lse.reshape(-1)


def check(x, mask, scale, causal_offset, dtype, mode):
    """Run the kernel and compare with the reference: exactly at the special values (0, -inf,
    NaN), within CAP eps elsewhere."""
    y, lse = op(x, mask, scale, causal_offset, dtype, mode)
    rows = x.numel() // x.shape[-1]
    assert lse.dtype == torch.float64 and lse.shape == (rows,)
    t = scores(x, mask, scale, causal_offset, dtype)
    softmax, log_softmax, ref_lse = reference_values(t)
    y, lse, t = y.cpu(), lse.cpu(), t.cpu()
    acc = accumulation_dtype(x.dtype, dtype)
    finite = ref_lse.isfinite()
    torch.testing.assert_close(lse[~finite], ref_lse[~finite], equal_nan=True, rtol=0, atol=0)
    if finite.any():
        assert lse_error(lse[finite], ref_lse[finite]) <= CAP * eps(acc)
    if mode == 2:
        assert y.shape == (0,) and y.dtype == dtype
        return y, lse
    assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous()
    ref = softmax if mode == 0 else log_softmax
    special = ~ref.isfinite() | (ref == 0)
    torch.testing.assert_close(y.double()[special], ref[special], equal_nan=True, rtol=0, atol=0)
    ordinary = ~special
    if ordinary.any():
        cond = (t - t.amax(-1, keepdim=True)).abs() if mode == 0 else None
        cond = cond[ordinary] if cond is not None else None
        assert rel_error(y[ordinary], ref[ordinary], cond) <= CAP * eps(dtype)
    return y, lse


B, H, S = 2, 3, 9


def make_mask(pattern: str, dtype: torch.dtype, shape=(B, H, S, S)):
    """A mask of the given broadcast pattern, expanded (0 strides) to ``shape``; bool masks
    drop about a third of the keys and, for patterns with a batch dim, all of batch 0's last
    query row or all of batch 1 (dead rows)."""
    b, h, sq, sk = shape
    kind, _, dims = pattern.partition(":")
    small = {
        "key": (b, 1, 1, sk),
        "square": (1, 1, sq, sk),
        "query": (b, h, sq, 1),
        "full": (b, h, sq, sk),
    }[dims]
    if kind == "bool":
        mask = torch.rand(small, device=DEVICE) > 0.35
        if dims == "key":
            mask[1] = False  # batch 1: every row dead
        elif dims in ("query", "full"):
            mask[0, :, -1] = False  # the last query row of batch 0 dead
    else:
        acc = accumulation_dtype(dtype)
        mask = torch.randn(small, dtype=acc, device=DEVICE)
        mask = mask.masked_fill(torch.rand(small, device=DEVICE) < 0.3, -INF)
    return mask.expand(shape)


PATTERNS = [
    None,
    "bool:key",
    "bool:square",
    "bool:query",
    "bool:full",
    "additive:key",
    "additive:full",
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("causal_offset", [None, 0, 2, -1])
@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_matches_the_float64_reference(pattern, causal_offset, dtype):
    x = torch.randn(B, H, S, S, dtype=dtype, device=DEVICE) * 3
    mask = None if pattern is None else make_mask(pattern, dtype)
    for mode in (0, 1, 2):
        check(x, mask, 0.3, causal_offset, dtype, mode)


@pytest.mark.parametrize("causal_offset", [7, 0, -2, 20])
def test_rectangular_causal(causal_offset):
    """S_q = 5 queries over S_k = 12 keys; offset S_k - S_q aligns them bottom right."""
    x = torch.randn(2, 3, 5, 12, device=DEVICE)
    mask = make_mask("bool:key", torch.float32, (2, 3, 5, 12))
    for mode in (0, 1):
        check(x, None, 1.0, causal_offset, torch.float32, mode)
        check(x, mask, 1.0, causal_offset, torch.float32, mode)


@pytest.mark.parametrize("scale", [1 / math.sqrt(64), -2.5, 0.0, 1e-30, 1 / 3])
def test_scale(scale):
    x = torch.randn(4, 40, dtype=torch.float64, device=DEVICE) * 10
    for dtype in (torch.float32, torch.float64):
        for mode in (0, 1):
            check(x.to(dtype), None, scale, None, dtype, mode)


def test_scale_is_applied_in_float64_for_float64_rows():
    """1/3 is not a float32: in float64, t must use the float64 scale."""
    x = torch.tensor([[3e8, 0.0]], dtype=torch.float64, device=DEVICE)
    _, lse = op(x, None, 1 / 3, None, torch.float64, 2)
    assert lse.item() == pytest.approx(1e8, rel=1e-15)
    assert lse.item() == torch.logsumexp(x * (1 / 3), -1).item()


def test_one_dimensional_x():
    """1-D x is one row, i = 0: the causal limit keeps j <= causal_offset."""
    x = torch.randn(50, device=DEVICE)
    for offset in (None, 0, 17, -1):
        for mode in (0, 1, 2):
            check(x, None, 1.0, offset, torch.float32, mode)
    y, lse = op(x, None, 1.0, -1, torch.float32, 0)
    assert torch.all(y == 0) and lse.item() == -INF


def test_dead_rows_are_zero_and_minus_inf():
    x = torch.randn(2, 4, 16, device=DEVICE)
    mask = torch.ones(2, 1, 16, dtype=torch.bool, device=DEVICE)
    mask[1] = False
    mask = mask.expand(2, 4, 16)
    y, lse = op(x, mask, 1.0, None, torch.float32, 0)
    assert torch.all(y[1] == 0) and torch.all(lse.view(2, 4)[1] == -INF)
    y, _ = op(x, mask, 1.0, None, torch.float32, 1)
    assert torch.all(y[1] == -INF)
    additive = torch.zeros(2, 4, 16, device=DEVICE)
    additive[0, 2] = -INF
    y, lse = op(x, additive, 1.0, None, torch.float32, 0)
    assert torch.all(y[0, 2] == 0) and lse.view(2, 4)[0, 2] == -INF
    assert torch.allclose(y[0, 1], torch.softmax(x[0, 1], -1))


def test_nan_and_inf_rows():
    """A NaN among the kept elements poisons its row (y and lse NaN); a NaN the mask drops
    does not; a +inf kept makes y NaN and lse +inf, as torch; a -inf in x is one more dropped
    element. Other rows are untouched."""
    x = torch.randn(5, 24, device=DEVICE)
    x[0, 3] = float("nan")  # kept
    x[1, 5] = float("nan")  # dropped by the mask
    x[2, 7] = INF  # kept
    x[3, 9] = -INF
    mask = torch.ones(5, 24, dtype=torch.bool, device=DEVICE)
    mask[1, 5] = False
    for mode in (0, 1):
        y, lse = check(x, mask, 1.0, None, torch.float32, mode)
        assert torch.isnan(y[0]).all() and torch.isnan(y[2]).all()
        assert not torch.isnan(y[1]).any() and not torch.isnan(y[3:]).any()
        assert math.isnan(lse[0]) and lse[2] == INF and lse[1:].isfinite().sum() == 3
    # A causal limit drops the NaN of row 0 past it (column 3 > 0 + 2).
    check(x[:3].unsqueeze(0), None, 1.0, 2, torch.float32, 0)


def test_half_rows():
    """float16 rows, written as float16 and as float32 (the computation is in float32)."""
    x = (torch.randn(2, 3, 6, 20, device=DEVICE) * 4).half()
    mask = make_mask("bool:key", torch.float32, (2, 3, 6, 20))
    for dtype in (torch.float16, torch.float32):
        for mode in (0, 1):
            check(x, mask, 0.5, 3, dtype, mode)
    additive = make_mask("additive:full", torch.float16, (2, 3, 6, 20))
    check(x, additive, 0.5, None, torch.float16, 0)


def test_bfloat16_rows():
    skip_unsupported(torch.bfloat16)
    x = torch.randn(2, 3, 6, 20, device=DEVICE).bfloat16()
    mask = make_mask("additive:key", torch.bfloat16, (2, 3, 6, 20))
    for mode in (0, 1):
        check(x, mask, 0.5, 0, torch.bfloat16, mode)


def test_row_lengths_across_the_block_sizes():
    """n from 1 to the widest row a program holds, ragged and not."""
    for n in (1, 2, 15, 16, 17, 100, 1023, 4097, 8192):
        x = torch.randn(3, n, device=DEVICE)
        mask = torch.rand(n, device=DEVICE).expand(3, n) > 0.2
        check(x, mask, 0.7, 1, torch.float32, 0)


# The split path: rows past MAX_BLOCK_N, chunks of SPLIT_CHUNK (8192), tiles of 2048.
LONG = 3 * 8192 + 300


@pytest.mark.parametrize(
    "causal_offset",
    [
        None,
        8190,  # limits 8190, 8191, 8192: the last element of chunk 0 and first of chunk 1
        2047,  # within chunk 0, at a tile edge; chunks 1..3 entirely past the limit
        10000,  # mid chunk 1: its later tiles written as constants
        -2,  # rows 0 and 1 dead
    ],
)
def test_long_rows_causal(causal_offset):
    x = torch.randn(1, 3, LONG, device=DEVICE) * 2
    x[0, 0, 5] = float("nan")  # row 0: NaN throughout (past its limit too) unless dropped
    for mode in (0, 1, 2):
        check(x, None, 1.0, causal_offset, torch.float32, mode)


@pytest.mark.parametrize("pattern", ["bool:key", "additive:query", "bool:full"])
def test_long_rows_masked(pattern):
    shape = (2, 1, 2, LONG)
    dtype = torch.float64 if pattern.startswith("additive") else torch.float32
    x = torch.randn(shape, dtype=dtype, device=DEVICE)
    mask = make_mask(pattern, dtype, shape)
    check(x, mask, 0.25, None, dtype, 0)
    check(x, mask, 0.25, LONG - 9000, dtype, 1)


def test_a_row_of_2_to_the_18_elements():
    x = torch.randn(2**18, device=DEVICE)
    x[100] = 30.0
    mask = torch.rand(2**18, device=DEVICE) > 0.5
    mask[100] = True
    for offset in (None, 150_000):
        check(x, mask, 1.0, offset, torch.float32, 0)


def test_the_mask_is_read_through_its_strides():
    """A transposed, a sliced and a broadcast mask: the same values as their contiguous
    copies."""
    x = torch.randn(3, 4, 10, device=DEVICE)
    base = torch.randn(10, 4, 3, device=DEVICE)
    for mask in (
        base.permute(2, 1, 0),  # strides (1, 3, 12)
        torch.randn(3, 8, 20, device=DEVICE)[:, ::2, ::2],
        torch.randn(4, 1, device=DEVICE).expand(3, 4, 10),
    ):
        y, lse = op(x, mask, 1.0, None, torch.float32, 0)
        y_c, lse_c = op(x, mask.contiguous(), 1.0, None, torch.float32, 0)
        torch.testing.assert_close(y, y_c, rtol=0, atol=0)
        torch.testing.assert_close(lse, lse_c, rtol=0, atol=0)
        check(x, mask, 1.0, None, torch.float32, 0)


def test_mask_dims_that_do_not_coalesce():
    """x's leading dims coalesce over the mask's strides; more than four that do not is a
    clear error, while any number that do is fine."""
    from stablekernels.backends.triton.masked_softmax import mask_layout

    x = torch.randn(2, 2, 2, 2, 2, 3, device=DEVICE)
    # strides (3, 6, 12, 24, 48, 1): no two leading dims coalesce
    free = torch.randn(2, 2, 2, 2, 2, 3, device=DEVICE).permute(4, 3, 2, 1, 0, 5)
    with pytest.raises(ValueError, match="at most 4"):
        op(x, free, 1.0, None, torch.float32, 0)
    assert mask_layout(x, torch.ones_like(x)) == (1, 1, 32, 0, 0, 0, 3, 1)
    key = torch.ones(2, 1, 1, 1, 1, 3, device=DEVICE).expand(x.shape)
    assert mask_layout(x, key) == (1, 2, 16, 0, 0, 3, 0, 1)
    check(x, key > 0, 1.0, None, torch.float32, 0)


def test_mode_2_writes_no_y():
    x = torch.randn(4, 8, device=DEVICE)
    y, lse = op(x, None, 1.0, None, torch.float16, 2)
    assert y.shape == (0,) and y.dtype == torch.float16
    torch.testing.assert_close(lse, torch.logsumexp(x.double(), -1), rtol=1e-6, atol=0)


def test_fake_cuda_tensors():
    """On fake CUDA tensors (no GPU: the launches recorded, not run, tools/triton_launches.py):
    the shapes and dtypes the kernel promises, and the launches of each path."""
    from tools.triton_launches import recorded_launches

    def names(launches):
        return [launch.name for launch in launches]

    with FakeTensorMode(), recorded_launches() as launches:
        x = torch.empty(2, 3, 5, 7, dtype=torch.float16, device="cuda")
        mask = torch.empty(2, 1, 1, 7, dtype=torch.bool, device="cuda").expand(2, 3, 5, 7)
        y, lse = op(x, mask, 0.5, 0, torch.float32, 1)
        assert y.shape == x.shape and y.dtype == torch.float32
        assert lse.shape == (30,) and lse.dtype == torch.float64
        assert names(launches) == ["_masked_softmax_kernel"]
        assert launches[0].device == torch.device("cuda:0")
        y, _ = op(x, None, 0.5, None, torch.float16, 2)
        assert y.shape == (0,) and y.dtype == torch.float16
        launches.clear()
        long = torch.empty(3, 2**20, dtype=torch.bfloat16, device="cuda")
        y, lse = op(long, None, 1.0, 5, torch.bfloat16, 0)
        assert y.shape == long.shape and lse.shape == (3,)
        assert names(launches) == [
            "_masked_parts_kernel",
            "_merge_parts_kernel",
            "_masked_lse_kernel",
            "_masked_softmax_finish_kernel",
        ]
        assert launches[0].grid == (3 * 2**20 // 8192,)
        launches.clear()
        op(long, None, 1.0, None, torch.bfloat16, 2)
        assert "_masked_softmax_finish_kernel" not in names(launches)


@pytest.mark.skipif(DEVICE != "cuda", reason="opcheck traces the kernels: GPU only")
def test_opcheck():
    x = torch.randn(2, 3, 5, 7, device="cuda")
    mask = (torch.rand(2, 1, 1, 7, device="cuda") > 0.3).expand(2, 3, 5, 7)
    long = torch.randn(2, 20000, device="cuda")
    for args in [
        (x, mask, 0.5, 0, torch.float32, 0),
        (x, None, 1.0, None, torch.float32, 2),
        (long, None, 1.0, 100, torch.float32, 1),
    ]:
        results = torch.library.opcheck(
            torch.ops.stablekernels._triton_masked_softmax.default, args
        )
        assert set(results.values()) == {"SUCCESS"}, results


def test_the_triton_record_carries_the_kernel():
    kernels = backends.BACKENDS["triton"].kernels()
    assert kernels.masked_softmax is torch.ops.stablekernels._triton_masked_softmax
    assert (
        backends.argument_names(kernels.masked_softmax)
        == backends.KERNEL_ARGUMENTS["masked_softmax"]
    )
