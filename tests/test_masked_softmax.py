"""Attention-ready softmax: sk.softmax / log_softmax / logsumexp with scale, mask (bool or
additive, broadcast) and causal, against a float64 reference (masked_fill(-inf) + softmax,
rows with nothing kept zeroed), on every CPU backend; gradients, special rows, compile,
opcheck, no broadcast-sized temporaries, errors."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import stablekernels as sk
from stablekernels.ops._library import ops

from .conftest import eps

OPS = ("softmax", "log_softmax", "logsumexp")
NINF = float("-inf")


def _causal_drop(queries: int, keys: int, offset: int) -> torch.Tensor:
    j = torch.arange(keys)
    i = torch.arange(queries)[:, None]
    return j > i + offset


def reference(x, op, scale=None, mask=None, causal=None, masked_rows="zero"):
    """The formula in float64: t = scale * x, masked_fill(-inf) where a bool mask is False
    (or added, a float mask), causal drops j > i + offset; rows with nothing kept are 0 /
    -inf (or NaN)."""
    t = x.double() * (1.0 if scale is None else scale)
    if mask is not None:
        t = t.masked_fill(~mask, NINF) if mask.dtype == torch.bool else t + mask.double()
    if causal is not None:
        queries = x.shape[-2] if x.dim() >= 2 else 1
        drop = _causal_drop(queries, x.shape[-1], causal)
        t = t.masked_fill(drop if x.dim() >= 2 else drop[0], NINF)
    dead = (t == NINF).all(-1, keepdim=True)
    if op == "logsumexp":
        out = torch.logsumexp(t, -1)
        fill = float("nan") if masked_rows == "nan" else NINF
        return torch.where(dead.squeeze(-1), fill, out)
    y = torch.log_softmax(t, -1) if op == "log_softmax" else torch.softmax(t, -1)
    fill = float("nan") if masked_rows == "nan" else (NINF if op == "log_softmax" else 0.0)
    return torch.where(dead, fill, y)


def _call(op, x, backend, **kw):
    return getattr(sk, op)(x, -1, backend=backend, **kw)


def _scores(b=2, h=3, q=5, k=37, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, q, k, generator=g, dtype=torch.float64) * 4).to(dtype)


def _masks(b=2, h=3, q=5, k=37, seed=1):
    """name -> mask of (b, h, q, k)-broadcastable shape, each with some row fully dropped."""
    g = torch.Generator().manual_seed(seed)
    padding = torch.rand(b, 1, 1, k, generator=g) > 0.3  # key padding
    padding[1, :, :, :] = False  # batch 1: every key padded -> dead rows
    square = torch.rand(1, 1, q, k, generator=g) > 0.5
    square[0, 0, 2] = False
    full = torch.rand(b, h, q, k, generator=g) > 0.4
    per_query = torch.rand(b, h, q, 1, generator=g) > 0.3  # broadcast along keys
    bias = torch.randn(1, h, 1, k, generator=g, dtype=torch.float64) * 2  # ALiBi-like
    additive = torch.where(padding, 0.0, NINF).double()
    return {
        "none": None,
        "bool (b,1,1,k)": padding,
        "bool (1,1,q,k)": square,
        "bool full": full,
        "bool (b,h,q,1)": per_query,
        "additive (1,h,1,k)": bias,
        "additive -inf (b,1,1,k)": additive,
    }


TOLERANCE = {torch.float32: 8 * eps(torch.float32), torch.float64: 64 * eps(torch.float64),
             torch.bfloat16: eps(torch.bfloat16)}  # fmt: skip


def _assert_matches(actual, expected, dtype, op):
    assert actual.dtype == dtype, (actual.dtype, dtype)
    exp = expected.to(dtype).double()
    act = actual.double()
    same_special = (act.isnan() == exp.isnan()).all() and ((act == NINF) == (exp == NINF)).all()
    assert same_special, (act, exp)
    finite = exp.isfinite()
    err = (act[finite] - exp[finite]).abs()
    scale = exp[finite].abs().clamp_min(1.0 if op != "softmax" else 0.0)
    if op == "softmax":  # relative, floored at the dtype's tiny
        scale = exp[finite].abs().clamp_min(torch.finfo(dtype).tiny)
    assert (err <= TOLERANCE[dtype] * 4 * scale + torch.finfo(dtype).tiny).all(), (
        err / scale
    ).max()


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("mask_name", list(_masks()))
@pytest.mark.parametrize("causal", [None, 0, 2, -1])
def test_matches_the_float64_reference(backend, op, mask_name, causal):
    x = _scores()
    mask = _masks()[mask_name]
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.float()
    kw = {"scale": 0.3, "mask": mask}
    if causal is not None:
        kw.update(causal=True, causal_offset=causal)
    out = _call(op, x, backend, **kw)
    _assert_matches(out, reference(x, op, 0.3, mask, causal), torch.float32, op)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtypes(backend, op, dtype):
    x = _scores(dtype=dtype)
    mask = _masks()["bool (b,1,1,k)"]
    out = _call(op, x, backend, scale=0.5, mask=mask, causal=True)
    _assert_matches(out, reference(x, op, 0.5, mask, 0), dtype, op)


@pytest.mark.parametrize("op", ("softmax", "log_softmax"))
def test_output_dtype_and_no_options_is_the_plain_op(backend, op):
    x = _scores(dtype=torch.bfloat16)
    out = _call(op, x, backend, mask=_masks()["bool full"], dtype=torch.float32)
    _assert_matches(out, reference(x, op, None, _masks()["bool full"]), torch.float32, op)
    plain = _call(op, x, backend)
    torch.testing.assert_close(plain, getattr(sk, op)(x, -1, backend=backend), rtol=0, atol=0)


@pytest.mark.parametrize("op", OPS)
def test_rectangular_causal_and_long_rows(backend, op):
    # Rows longer than one chunk of the cpp kernels (16384) and of the Triton blocks.
    keys = 20000 if backend != "triton" else 3000
    x = _scores(b=1, h=1, q=3, k=keys)
    mask = torch.rand(1, 1, 1, keys) > 0.2
    for offset in (keys - 3, 5, -2):
        out = _call(op, x, backend, mask=mask, causal=True, causal_offset=offset)
        _assert_matches(out, reference(x, op, None, mask, offset), torch.float32, op)


@pytest.mark.parametrize("op", OPS)
def test_masked_rows_nan_and_special_values(backend, op):
    x = _scores(b=1, h=1, q=4, k=9)
    x[0, 0, 0, 3] = float("nan")  # dropped below: no effect
    x[0, 0, 1, 4] = float("nan")  # kept: the row is NaN, as torch
    x[0, 0, 3, :] = NINF  # every kept element -inf: a dead row, as a fully masked one
    mask = torch.ones(1, 1, 4, 9, dtype=torch.bool)
    mask[0, 0, 0, 3] = False
    mask[0, 0, 2, :] = False  # nothing kept
    for masked_rows in ("zero", "nan"):
        out = _call(op, x, backend, mask=mask, masked_rows=masked_rows)
        expected = reference(x, op, None, mask, None, masked_rows)
        _assert_matches(out, expected, torch.float32, op)
    # Without mask, scale or causal, all -inf rows stay NaN (torch's softmax).
    if op != "logsumexp":
        assert _call(op, x, backend)[0, 0, 3].isnan().all()


def test_scale_only_and_vectors(backend):
    x = torch.randn(7, dtype=torch.float64)
    for op in OPS:
        out = _call(op, x, backend, scale=2.5)
        _assert_matches(out, reference(x, op, 2.5), torch.float64, op)
        out = _call(op, x, backend, causal=True, causal_offset=3)  # 1-D: query index 0
        _assert_matches(out, reference(x, op, None, None, 3), torch.float64, op)
        zero_dim = _call(op, torch.tensor(3.0, dtype=torch.float64), backend, scale=2.0)
        _assert_matches(
            zero_dim, reference(torch.tensor([3.0]), op, 2.0).reshape(()), torch.float64, op
        )


@pytest.mark.parametrize("op", OPS)
def test_gradcheck_of_x_and_an_additive_mask(backend, op):
    x = _scores(b=2, h=1, q=3, k=6, dtype=torch.float64).requires_grad_()
    bias = torch.randn(1, 1, 1, 6, dtype=torch.float64, requires_grad=True)
    keep = torch.ones(2, 1, 3, 6, dtype=torch.bool)
    keep[1, :, 2] = False  # a dead row
    keep[0, :, 1, :2] = False

    def f(x, bias):
        t = getattr(sk, op)(x, -1, scale=0.7, mask=bias, causal=True, backend=backend)
        # A second, bool-masked call: dropped elements and dead rows contribute nothing.
        u = getattr(sk, op)(x, -1, mask=keep, masked_rows="nan", backend=backend)
        return tuple(torch.where(v.isfinite(), v, 0.0) for v in (t, u))

    torch.autograd.gradcheck(f, (x, bias), fast_mode=backend == "triton")
    # Dead rows (NaN under masked_rows="nan") have a zero gradient, not NaN.
    y = getattr(sk, op)(x, -1, mask=keep, masked_rows="nan", backend=backend)
    (grad,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert grad[1, 0, 2].eq(0).all() and grad.isfinite().all()


@pytest.mark.parametrize("op", OPS)
def test_forward_mode_and_vmap(backend, op):
    x = _scores(b=2, h=1, q=3, k=6, dtype=torch.float64)
    bias = torch.randn(1, 1, 1, 6, dtype=torch.float64)
    tx, tb = torch.randn_like(x), torch.randn_like(bias)

    def f(x, bias):
        return getattr(sk, op)(x, -1, scale=0.7, mask=bias, causal=True, backend=backend)

    def ref(x, bias):
        return reference(x, op, 0.7, bias, 0)

    out, tangent = torch.func.jvp(f, (x, bias), (tx, tb))
    _, expected = torch.func.jvp(ref, (x, bias), (tx, tb))
    finite = out.isfinite()  # a dropped element's -inf has no derivative: ours is 0 there
    torch.testing.assert_close(tangent[finite], expected[finite])
    assert tangent[~finite].eq(0).all()
    batched = torch.vmap(f, in_dims=(0, None))(x, bias[0])
    torch.testing.assert_close(batched, out, equal_nan=True)


class _Created(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and func._schema.name != "aten::expand":
                self.sizes.append((func._schema.name, t.numel()))
        return out


def test_no_broadcast_sized_temporary(backend):
    """The mask is read by its strides: the only x-sized tensor a fused backend creates is
    the output (an additive mask is converted to float32 at its own size, then expanded)."""
    if backend == "torch":
        pytest.skip("the torch backend is the reference: masked_fill and the row statistics")
    x = _scores(b=2, h=4, q=16, k=64)
    for mask in (_masks(q=16, k=64, h=4)["bool (b,1,1,k)"],
                 torch.randn(1, 4, 1, 64, dtype=torch.float64)):  # fmt: skip
        with _Created() as created:
            sk.softmax(x, mask=mask, scale=0.1, causal=True, backend=backend)
        big = [name for name, n in created.sizes if n >= x.numel()]
        assert len(big) == 1, created.sizes


def test_compile_fullgraph_and_opcheck():
    backend = "cpp" if "cpp" in sk.available_backends() else "torch"
    x = _scores()
    mask = _masks()["bool (b,1,1,k)"]

    def attention_weights(x, mask):
        return sk.softmax(x, mask=mask, scale=0.125, causal=True, backend=backend)

    compiled = torch.compile(attention_weights, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, mask), attention_weights(x, mask))
    bias = torch.randn(1, 3, 1, 37)
    samples = [
        (ops.masked_softmax.default, (x, mask, 0.5, 0, None, False, False, backend)),
        (
            ops.masked_softmax.default,
            (x.double(), bias.double(), 1.0, None, None, True, True, backend),
        ),  # fmt: skip
        (ops.masked_logsumexp.default, (x, mask, 0.5, 1, False, backend)),
        (ops.masked_logsumexp.default, (x.double(), bias, 2.0, None, True, backend)),
    ]
    for op, args in samples:
        args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
                     and a is args[0] else a for a in args)  # fmt: skip
        torch.library.opcheck(op, args)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"mask": torch.ones(3, 5, dtype=torch.bool)}, RuntimeError, "cannot be broadcast"),
        ({"mask": torch.ones(37, dtype=torch.int32)}, RuntimeError, "bool .* or floating"),
        ({"mask": [True]}, TypeError, "'mask' must be Tensor"),
        ({"causal": 1}, TypeError, "'causal' must be bool"),
        ({"scale": "2"}, TypeError, "'scale' must be float"),
        ({"causal": True, "causal_offset": 1.5}, TypeError, "'causal_offset' must be int"),
        ({"masked_rows": "ignore", "causal": True}, ValueError, "masked_rows must be"),
        ({"causal": True, "dim": 2}, NotImplementedError, "along the last dim only"),
    ],
)
def test_bad_arguments_raise(backend, kwargs, error, match):
    x = _scores()
    kwargs = dict(kwargs)
    dim = kwargs.pop("dim", -1)
    with pytest.raises(error, match=match):
        sk.softmax(x, dim, backend=backend, **kwargs)
