"""The masked softmax's backward kernel (``Kernels.masked_softmax_backward``) and the forward
kernel's logsumexp mode and NaN rows, called directly on every CPU backend: against a float64
reference and torch's autograd of ``masked_fill(-inf)`` + softmax, with dead rows (zero
gradient, also under masked_rows="nan"), scale != 1, log_softmax (0 at dropped elements),
float16 / bfloat16, long rows; bitwise against the composition it replaces (the plain
backward kernel, then ``* scale`` and the fills) where the arithmetic is the same."""

from __future__ import annotations

import pytest
import torch

import stablekernels as sk
from stablekernels import backends
from stablekernels._masked import MaskedMode, MaskedRows
from stablekernels._numerics import accumulation_dtype

from .conftest import eps

NINF = float("-inf")


def _kernels(backend):
    return backends.BACKENDS[backend].kernels()


def _skip_unsupported(backend, dtype):
    if dtype == torch.bfloat16 and backend == "triton" and backends.TRITON_INTERPRETER:
        pytest.skip("bfloat16 under the Triton interpreter: numpy has no bfloat16 (runs on GPU)")


def _case(dtype=torch.float32, b=2, q=5, n=37, seed=0):
    """(x, keep): scores (b, 3, q, n) and a bool mask with a key-padded batch (dead rows), a
    fully dropped query row and scattered drops."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, 3, q, n, generator=g, dtype=torch.float64) * 3).to(dtype)
    keep = torch.rand(b, 3, q, n, generator=g) > 0.3
    keep[1, :, :, :] = False  # every key padded: dead rows
    keep[0, 1, 2, :] = False
    return x, keep


def _forward(backend, x, keep, scale, log, dtype=None, masked_rows=MaskedRows.ZERO):
    mode = MaskedMode.LOG_SOFTMAX if log else MaskedMode.SOFTMAX
    dtype = x.dtype if dtype is None else dtype
    y, lse = _kernels(backend).masked_softmax(x, keep, scale, None, dtype, mode, masked_rows)
    return y, lse


def _reference(grad, y, lse, scale, log):
    """The rule in float64 from the kernel's own y (what the backward reads)."""
    return _reference_and_size(grad, y, lse, scale, log)[0]


def _reference_and_size(grad, y, lse, scale, log):
    """(the reference, the size of its terms): the error bound scales with the latter
    (|scale| (|g| + e^y sum |g|), or |scale| y (|g| + sum |g y|))."""
    g, yd = grad.double(), y.double()
    yd = torch.where(yd.isnan(), 0.0, yd)  # NaN rows (dead under NAN): zeroed below
    if log:
        d = g - yd.exp() * g.sum(-1, keepdim=True)
        size = g.abs() + yd.exp() * g.abs().sum(-1, keepdim=True)
    else:
        d = yd * (g - (g * yd).sum(-1, keepdim=True))
        size = yd.abs() * (g.abs() + (g * yd).abs().sum(-1, keepdim=True))
    dx = d * scale
    if log:
        dx = dx.masked_fill(yd == NINF, 0.0)
    dead = (lse == NINF).view(y.shape[:-1] + (1,))
    return dx.masked_fill(dead, 0.0), size * abs(scale)


TOLERANCE = {torch.float64: 16, torch.float32: 16, torch.float16: 2, torch.bfloat16: 2}


def _assert_close(dx, reference, dtype):
    expected, size = reference
    assert dx.dtype == dtype and dx.shape == expected.shape and dx.is_contiguous()
    err = (dx.double() - expected).abs()
    bound = TOLERANCE[dtype] * eps(dtype) * (expected.abs() + size)
    assert (err <= bound + torch.finfo(dtype).tiny).all(), (err - bound).max()


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("scale", [1.0, 0.125, -2.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_matches_the_float64_reference(backend, log, scale, dtype):
    _skip_unsupported(backend, dtype)
    x, keep = _case(dtype)
    y, lse = _forward(backend, x, keep, scale, log)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    dx = _kernels(backend).masked_softmax_backward(grad, y, lse, scale, log, dtype)
    _assert_close(dx, _reference_and_size(grad, y, lse, scale, log), dtype)
    dead = (lse == NINF).view(y.shape[:-1])
    assert dead[1].all() and dead[0, 1, 2] and not dead[0, 0].any()
    assert dx[dead].eq(0).all() and not dx[dead].signbit().any()  # +0, as masked_fill's
    if log:
        assert dx[(y == NINF) & ~dead[..., None]].eq(0).all()


@pytest.mark.parametrize("log", [False, True])
def test_matches_torch_autograd(backend, log):
    """dx of x through the forward and backward kernels against torch's autograd of the
    float64 formula (masked_fill(-inf), then softmax), rows with something kept; 0 on the
    dead rows, where torch's is NaN."""
    x, keep = _case(torch.float64)
    scale = 0.3
    y, lse = _forward(backend, x, keep, scale, log)
    grad = torch.randn_like(y)
    dx = _kernels(backend).masked_softmax_backward(grad, y, lse, scale, log, torch.float64)
    xr = x.clone().requires_grad_()
    t = (xr * scale).masked_fill(~keep, NINF)
    out = torch.log_softmax(t, -1) if log else torch.softmax(t, -1)
    live = keep.any(-1, keepdim=True).expand_as(out)
    (expected,) = torch.autograd.grad(out, xr, torch.where(live, grad, 0.0))
    torch.testing.assert_close(dx[live], expected[live], rtol=1e-12, atol=1e-13)
    assert dx[~live].eq(0).all()


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("scale", [1.0, 0.125, 3.0])
@pytest.mark.parametrize(
    ("out_dtype", "input_dtype"),
    [
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
        (torch.float16, torch.float32),
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.bfloat16),
    ],
)
def test_bitwise_the_composition_it_replaces(backend, log, scale, out_dtype, input_dtype):
    """The plain backward kernel, ``dx.mul_(scale)``, then the fills (log_softmax: where y is
    -inf; dead rows): the same bits where that arithmetic is the kernel's, i.e. dx written in
    the accumulation dtype (one rounding either way) or scale == 1 (exact); with a half dx
    and scale != 1 the old path rounded twice (checked against the reference instead)."""
    _skip_unsupported(backend, out_dtype)
    x, keep = _case(out_dtype, n=300)
    y, lse = _forward(backend, x, keep, scale, log)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(out_dtype)
    kernels = _kernels(backend)
    dx = kernels.masked_softmax_backward(grad, y, lse, scale, log, input_dtype)
    old = kernels.softmax_backward(grad, y, y.dim() - 1, input_dtype, log)
    if scale != 1.0:
        old.mul_(scale)
    if log:
        old.masked_fill_(y == NINF, 0.0)
    old.masked_fill_((lse == NINF).view(y.shape[:-1] + (1,)), 0.0)
    same_arithmetic = scale == 1.0 or input_dtype == accumulation_dtype(out_dtype, input_dtype)
    if same_arithmetic:
        assert torch.equal(dx, old), (dx - old).abs().max()
        assert torch.equal(dx.signbit(), old.signbit())
    else:
        _assert_close(dx, _reference_and_size(grad, y, lse, scale, log), input_dtype)


def test_nan_rows_forward_and_a_zero_gradient(backend):
    """masked_rows NAN: the forward kernel's dead rows are NaN (softmax, log_softmax and the
    logsumexp mode), its lse -inf; the backward is 0 there and the other rows unchanged."""
    x, keep = _case(torch.float64)
    kernels = _kernels(backend)
    for log in (False, True):
        y_zero, lse_zero = _forward(backend, x, keep, 0.5, log)
        y_nan, lse_nan = _forward(backend, x, keep, 0.5, log, masked_rows=MaskedRows.NAN)
        dead = (lse_nan == NINF).view(x.shape[:-1])
        assert torch.equal(lse_zero, lse_nan) and dead.any()
        assert y_nan[dead].isnan().all()
        assert torch.equal(y_nan[~dead], y_zero[~dead])
        grad = torch.randn_like(y_nan)
        dx_nan = kernels.masked_softmax_backward(grad, y_nan, lse_nan, 0.5, log, torch.float64)
        dx_zero = kernels.masked_softmax_backward(grad, y_zero, lse_zero, 0.5, log, torch.float64)
        assert dx_nan[dead].eq(0).all() and torch.equal(dx_nan, dx_zero)


@pytest.mark.parametrize("masked_rows", list(MaskedRows))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_logsumexp_mode(backend, masked_rows, dtype):
    """MaskedMode.LOGSUMEXP: y is the lse of each row rounded to ``dtype`` (NaN on dead rows
    for NAN), next to the float64 lse of the statistics mode."""
    _skip_unsupported(backend, dtype)
    x, keep = _case(dtype)
    kernels = _kernels(backend)
    out, lse = kernels.masked_softmax(x, keep, 0.5, 1, dtype, MaskedMode.LOGSUMEXP, masked_rows)
    _, stats = kernels.masked_softmax(x, keep, 0.5, 1, dtype, MaskedMode.STATISTICS, 0)
    rows = x.numel() // x.shape[-1]
    assert out.shape == (rows,) and out.dtype == dtype and lse.shape == (rows,)
    torch.testing.assert_close(lse, stats, rtol=0, atol=0)
    expected = lse.to(accumulation_dtype(dtype)).to(dtype)  # rounded once from the acc dtype
    if masked_rows == MaskedRows.NAN:
        expected = torch.where(lse == NINF, float("nan"), expected)
    assert (lse == NINF).any()
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("log", [False, True])
def test_long_rows(backend, log):
    """Rows past one chunk of the cpp kernels (split over threads) and past the Triton
    blocks (its two-launch path); a causal mask makes the rows' dropped tails."""
    n = 20000 if backend != "triton" else 9000
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, n, generator=g, dtype=torch.float32) * 4
    kernels = _kernels(backend)
    mode = MaskedMode.LOG_SOFTMAX if log else MaskedMode.SOFTMAX
    y, lse = kernels.masked_softmax(x, None, 0.7, n // 2 - 3, torch.float32, mode, 0)
    grad = torch.randn(y.shape, generator=g)
    dx = kernels.masked_softmax_backward(grad, y, lse, 0.7, log, torch.float32)
    _assert_close(dx, _reference_and_size(grad, y, lse, 0.7, log), torch.float32)
    assert dx[:, n - 1].eq(0).all()  # past every row's causal limit


def test_the_op_and_its_fakes():
    """The masked_softmax_backward op routes to the kernel (0-dim and 1-D inputs included),
    and opcheck passes on it and on the extension's kernel op (its fake)."""
    from stablekernels.ops._library import ops

    backend = "cpp" if "cpp" in sk.available_backends() else "torch"
    x, keep = _case(torch.float64)
    y, lse = ops.masked_softmax(x, keep, 0.5, None, None, True, MaskedRows.NAN, backend)
    grad = torch.randn_like(y)
    dx = ops.masked_softmax_backward(grad, y, lse, 0.5, True, torch.float64, backend)
    torch.testing.assert_close(dx, _reference(grad, y, lse.reshape(-1), 0.5, True))
    for shape in ((), (6,)):
        v = torch.randn(shape, dtype=torch.float64)
        y1, lse1 = ops.masked_softmax(v, None, 2.0, None, None, False, 0, backend)
        dx1 = ops.masked_softmax_backward(
            torch.ones_like(v), y1, lse1, 2.0, False, v.dtype, backend
        )
        assert dx1.shape == shape
        assert dx1.abs().max() < 1e-12  # softmax's gradient along a constant grad is 0
    with pytest.raises(RuntimeError, match="lse has shape"):
        ops.masked_softmax_backward(grad, y, lse.reshape(-1), 0.5, True, torch.float64, backend)
    # opcheck compares its inputs without equal_nan: the output of masked_rows "zero".
    y, lse = ops.masked_softmax(x, keep, 0.5, None, None, True, MaskedRows.ZERO, backend)
    torch.library.opcheck(
        ops.masked_softmax_backward.default, (grad, y, lse, 0.5, True, torch.float64, backend)
    )
    if backends.EXTENSION:
        fused = torch.ops.stablekernels._fused_masked_softmax_backward.default
        torch.library.opcheck(fused, (grad, y, lse.reshape(-1), 0.5, True, torch.float32))
        forward = torch.ops.stablekernels._fused_masked_softmax.default
        torch.library.opcheck(forward, (x, keep, 0.5, 0, torch.float32, MaskedMode.LOGSUMEXP, 0))
