"""Gradients: gradcheck and gradgradcheck in float64, backward against torch and a float64
reference in every dtype."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import stablekernels as sk

from . import reference
from .conftest import FLOAT_DTYPES, eps, scaled_error

# (shape, dim) small enough for finite differences.
GRAD_CASES = [((5,), 0), ((3, 7), 1), ((3, 7), 0), ((2, 3, 4), 1), ((), 0), ((4, 1), 1)]


def _fn(name, backend, dim, **kw):
    op = getattr(sk, name)
    return lambda x: op(x, dim, backend=backend, **kw)


@pytest.mark.parametrize("shape,dim", GRAD_CASES)
@pytest.mark.parametrize(
    "name,kw",
    [("softmax", {}), ("log_softmax", {}), ("logsumexp", {}), ("logsumexp", {"keepdim": True})],
)
def test_gradcheck_and_gradgradcheck(backend, name, kw, shape, dim):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    fn = _fn(name, backend, dim, **kw)
    assert gradcheck(fn, (x,))
    assert gradgradcheck(fn, (x,))


def test_gradgradcheck_of_logsumexp_over_several_dims(backend):
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    for keepdim in (False, True):
        fn = lambda t, k=keepdim: sk.logsumexp(t, (0, 2), k, backend=backend)  # noqa: E731
        assert gradcheck(fn, (x,))
        assert gradgradcheck(fn, (x,))


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@pytest.mark.parametrize(
    "in_dtype,out_dtype", [(torch.float64, torch.float32), (torch.float32, torch.float64)]
)
def test_gradient_through_the_dtype_argument(backend, name, in_dtype, out_dtype):
    x = torch.randn(4, 33, dtype=in_dtype)
    dy = torch.randn(4, 33, dtype=out_dtype)
    a = x.clone().requires_grad_()
    getattr(sk, name)(a, 1, dtype=out_dtype, backend=backend).backward(dy)
    b = x.clone().requires_grad_()
    getattr(torch, name)(b, 1, dtype=out_dtype).backward(dy)
    assert a.grad.dtype == in_dtype
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def _grad(fn, x, dy):
    x = x.detach().clone().requires_grad_()
    fn(x).backward(dy)
    return x.grad


BACKWARD_SHAPES = [
    ((4, 1025), -1),
    ((3, 70000), 1),
    ((1, 300000), 1),
    ((6, 5, 17), 0),
    ((6, 5, 17), 1),
]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape,dim", BACKWARD_SHAPES)
@pytest.mark.parametrize("name", ["softmax", "log_softmax", "logsumexp"])
def test_backward_against_torch_and_float64(backend, name, shape, dim, dtype):
    x = (torch.randn(shape, dtype=torch.float64) * 3).to(dtype)
    out_shape = torch.logsumexp(x.double(), dim).shape if name == "logsumexp" else shape
    dy = torch.randn(out_shape, dtype=torch.float64).to(dtype)
    ours = _grad(_fn(name, backend, dim), x, dy)
    theirs = _grad(lambda t: getattr(torch, name)(t, dim), x, dy)
    ref = reference.backward(name, x, dy, dim)
    assert ours.dtype == dtype and ours.shape == x.shape
    ours_err, theirs_err = scaled_error(ours, ref), scaled_error(theirs, ref)
    assert ours_err <= 2 * theirs_err + 4 * eps(dtype)
    if dtype == torch.float32:
        # Elementwise too, against the float64 truth (torch's own fp32 backward drifts from
        # it by more than this at 300k columns, by an amount that depends on its CPU
        # kernels' vector width).
        scale = ref.abs().max().item()
        torch.testing.assert_close(ours, ref.float(), rtol=1e-5, atol=1e-5 * scale)


def test_non_contiguous_and_expanded_gradients(backend):
    x = torch.randn(7, 12, requires_grad=True)
    # sum() hands the backward an expanded (stride-0) gradient.
    sk.softmax(x.t(), 0, backend=backend).mul(torch.arange(7.0)).sum().backward()
    ours = x.grad.clone()
    x.grad = None
    torch.softmax(x.t(), 0).mul(torch.arange(7.0)).sum().backward()
    torch.testing.assert_close(ours, x.grad)
    x.grad = None
    sk.logsumexp(x, 1, backend=backend).sum().backward()
    torch.testing.assert_close(x.grad, torch.softmax(x.detach(), 1))


def test_gradients_of_modules(backend):
    x = torch.randn(3, 8, requires_grad=True)
    sk.nn.LogSoftmax(1, backend=backend)(x)[:, 0].sum().backward()
    expected = -torch.softmax(x.detach(), 1)
    expected[:, 0] += 1
    torch.testing.assert_close(x.grad, expected)


@pytest.mark.parametrize(
    "dtype,offset", [(torch.bfloat16, 100.0), (torch.float16, 100.0), (torch.float32, 1e6)]
)
def test_logsumexp_gradient_uses_the_unrounded_lse(backend, dtype, offset):
    # dx = dy * exp(x - lse): an lse rounded to the input dtype (ulp 0.5 at 100 in bf16,
    # 0.06 at 1e6 in fp32) would put its rounding error into every gradient entry; the
    # backward uses the lse in float64, so what remains is the rounding of dx and the
    # magnification |x - lse| of the rounding of x - lse.
    x = (torch.randn(8, 300, dtype=torch.float64) * 3 + offset).to(dtype)
    dy = torch.randn(8, dtype=torch.float64).to(dtype)
    ours = _grad(_fn("logsumexp", backend, 1), x, dy)
    ref = reference.backward("logsumexp", x, dy, 1)
    lse = reference.logsumexp(x, 1, keepdim=True)
    err = (ours.double() - ref).abs() / ref.abs().clamp(min=torch.finfo(dtype).tiny)
    bound = eps(dtype) * (1 + (x.double() - lse).abs() * eps(torch.float32) / eps(dtype))
    assert (err <= bound).all(), (err / bound).max()


def test_a_missing_autograd_kernel_fails_the_suite():
    """The suite turns torch's warning about an op without an autograd kernel into an error
    (pyproject.toml), so every test that backpropagates through such an op fails: here a
    throwaway op with a CPU kernel only."""
    lib = torch.library.Library("stablekernels_test_no_autograd", "DEF")
    lib.define("twice(Tensor x) -> Tensor")
    lib.impl("twice", lambda x: x * 2, "CPU")
    x = torch.randn(3, requires_grad=True)
    with pytest.raises(UserWarning, match="an autograd kernel was not registered"):
        torch.ops.stablekernels_test_no_autograd.twice(x).sum().backward()


def test_every_stablekernels_op_has_an_autograd_kernel():
    """Every public op of the namespace, the backward ops included, has its own autograd
    kernel (none is left to torch's fallback)."""
    from stablekernels.ops._library import SCHEMAS

    for name in SCHEMAS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(
            f"stablekernels::{name}", "Autograd"
        ), name
