"""torch.func transforms and forward-mode AD of every op on every backend, against torch's
own results in float64 (tolerance 1e-10): jvp, jacfwd, jacrev, grad, vmap, vmap(grad),
hessian (forward-over-reverse) and reverse-over-reverse, forward_ad.make_dual, and
gradcheck with forward AD and batched gradients. vmap must use the ops' batching rules
(the slow per-sample fallback warns, which is an error here)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vmap

import stablekernels as sk

TOL = {"rtol": 1e-10, "atol": 1e-10}
TARGET = torch.tensor([0, 4, 2])
WEIGHT = torch.tensor([0.5, 1.0, 2.0, 0.25, 1.5], dtype=torch.float64)
PROBABILITIES = torch.softmax(torch.arange(15, dtype=torch.float64).reshape(3, 5).cos(), 1)

# name -> (ours(x, backend), torch's(x)) on a (3, 5) float64 input.
OPS = {
    "softmax": (
        lambda x, b: sk.softmax(x, 1, backend=b),
        lambda x: torch.softmax(x, 1),
    ),
    "softmax_dim0": (
        lambda x, b: sk.softmax(x, 0, backend=b),
        lambda x: torch.softmax(x, 0),
    ),
    "log_softmax": (
        lambda x, b: sk.log_softmax(x, 0, backend=b),
        lambda x: torch.log_softmax(x, 0),
    ),
    "logsumexp": (
        lambda x, b: sk.logsumexp(x, 1, backend=b),
        lambda x: torch.logsumexp(x, 1),
    ),
    "logsumexp_keepdim_all": (
        lambda x, b: sk.logsumexp(x, (0, 1), keepdim=True, backend=b),
        lambda x: torch.logsumexp(x, (0, 1), keepdim=True),
    ),
    "cross_entropy": (
        lambda x, b: sk.cross_entropy(x, TARGET, backend=b),
        lambda x: F.cross_entropy(x, TARGET),
    ),
    "cross_entropy_options": (
        lambda x, b: sk.cross_entropy(
            x, TARGET, WEIGHT, ignore_index=2, label_smoothing=0.2, reduction="sum", backend=b
        ),
        lambda x: F.cross_entropy(
            x, TARGET, WEIGHT, ignore_index=2, label_smoothing=0.2, reduction="sum"
        ),
    ),
    "cross_entropy_none": (
        lambda x, b: sk.cross_entropy(x, TARGET, label_smoothing=0.1, reduction="none", backend=b),
        lambda x: F.cross_entropy(x, TARGET, label_smoothing=0.1, reduction="none"),
    ),
    "cross_entropy_probabilities": (
        lambda x, b: sk.cross_entropy(x, PROBABILITIES, backend=b),
        lambda x: F.cross_entropy(x, PROBABILITIES),
    ),
}
SCALAR_OPS = [n for n in OPS if not n.startswith(("softmax", "log_softmax", "cross_entropy_none"))]


@pytest.fixture(autouse=True)
def _no_vmap_fallback():
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*batching rule.*")
        yield


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, dtype=torch.float64, generator=g) * 2
    t = torch.randn(3, 5, dtype=torch.float64, generator=g)
    return x, t


@pytest.mark.parametrize("name", OPS)
def test_jvp_jacfwd_jacrev(backend, name):
    ours, ref = OPS[name]
    x, t = _inputs()
    f = lambda z: ours(z, backend)  # noqa: E731
    out, tangent = jvp(f, (x,), (t,))
    ref_out, ref_tangent = jvp(ref, (x,), (t,))
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(tangent, ref_tangent, **TOL)
    torch.testing.assert_close(jacfwd(f)(x), jacrev(ref)(x), **TOL)
    torch.testing.assert_close(jacrev(f)(x), jacrev(ref)(x), **TOL)


@pytest.mark.parametrize("name", OPS)
def test_forward_ad_make_dual(backend, name):
    ours, ref = OPS[name]
    x, t = _inputs(1)
    with forward_ad.dual_level():
        tangent = forward_ad.unpack_dual(ours(forward_ad.make_dual(x, t), backend)).tangent
    assert tangent is not None
    torch.testing.assert_close(tangent, jvp(ref, (x,), (t,))[1], **TOL)


@pytest.mark.parametrize("name", SCALAR_OPS)
def test_grad_hessian_and_reverse_over_reverse(backend, name):
    ours, ref = OPS[name]
    x, _ = _inputs(2)

    def f(z):
        return ours(z, backend).sum()

    def g(z):
        return ref(z).sum()

    torch.testing.assert_close(grad(f)(x), grad(g)(x), **TOL)
    expected = jacrev(jacrev(g))(x)
    torch.testing.assert_close(hessian(f)(x), expected, **TOL)
    torch.testing.assert_close(jacrev(jacrev(f))(x), expected, **TOL)
    torch.testing.assert_close(jacrev(jacfwd(f))(x), expected, **TOL)


@pytest.mark.parametrize("name", ["softmax", "log_softmax", "logsumexp"])
def test_second_derivatives_of_vector_ops(backend, name):
    ours, ref = OPS[name]
    x, _ = _inputs(3)
    w = torch.linspace(-1, 1, ref(x).numel(), dtype=torch.float64).reshape(ref(x).shape)

    def f(z):
        return (ours(z, backend) * w).sum()

    def g(z):
        return (ref(z) * w).sum()

    torch.testing.assert_close(hessian(f)(x), hessian(g)(x), **TOL)


@pytest.mark.parametrize("name", OPS)
def test_vmap_and_vmap_of_grad(backend, name):
    ours, ref = OPS[name]
    xs = torch.randn(4, 3, 5, dtype=torch.float64)
    f = lambda z: ours(z, backend)  # noqa: E731
    torch.testing.assert_close(vmap(f)(xs), vmap(ref)(xs), **TOL)
    # the vmapped dim elsewhere than in front
    torch.testing.assert_close(
        vmap(f, in_dims=2)(xs.permute(1, 2, 0)), vmap(ref, in_dims=2)(xs.permute(1, 2, 0)), **TOL
    )
    torch.testing.assert_close(
        vmap(grad(lambda z: f(z).sum()))(xs), vmap(grad(lambda z: ref(z).sum()))(xs), **TOL
    )


def test_vmap_of_scalars_and_nested_vmap(backend):
    xs = torch.randn(6, dtype=torch.float64)
    for name in ("softmax", "log_softmax", "logsumexp"):
        ours, ref = getattr(sk, name), getattr(torch, name)
        torch.testing.assert_close(
            vmap(lambda z, f=ours: f(z, 0, backend=backend))(xs),
            vmap(lambda z, f=ref: f(z, 0))(xs),
            **TOL,
        )
    x4 = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    f = vmap(vmap(lambda z: sk.log_softmax(z, -1, backend=backend)))
    torch.testing.assert_close(f(x4), torch.log_softmax(x4, -1), **TOL)


def test_vmap_of_cross_entropy_over_targets_and_weights(backend):
    xs = torch.randn(4, 3, 5, dtype=torch.float64)
    targets = torch.randint(0, 5, (4, 3))
    weights = torch.rand(4, 5, dtype=torch.float64) + 0.1

    def ours(x, t, w):
        return sk.cross_entropy(x, t, w, label_smoothing=0.1, backend=backend)

    def ref(x, t, w):
        return F.cross_entropy(x, t, w, label_smoothing=0.1)

    def per_sample(fn, args, in_dims):  # torch's own vmap cannot batch its weight here
        samples = [
            fn(*[a if d is None else a[i] for a, d in zip(args, in_dims, strict=True)])
            for i in range(4)
        ]
        return torch.stack(samples)

    for in_dims in [(0, 0, 0), (0, 0, None), (None, 0, None), (0, None, 0)]:
        args = [
            a if d is not None else a[0]
            for a, d in zip((xs, targets, weights), in_dims, strict=True)
        ]
        torch.testing.assert_close(
            vmap(ours, in_dims)(*args), per_sample(ref, args, in_dims), **TOL
        )
        torch.testing.assert_close(
            vmap(grad(ours), in_dims)(*args), per_sample(grad(ref), args, in_dims), **TOL
        )


@pytest.mark.parametrize("name", OPS)
def test_gradcheck_with_forward_ad_and_batched_grads(backend, name):
    ours, _ = OPS[name]
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda z: ours(z, backend),
        (x,),
        check_forward_ad=True,
        check_batched_grad=True,
        check_batched_forward_grad=True,
    )


def test_forward_over_forward_raises_instead_of_a_wrong_answer(backend):
    x, _ = _inputs(4)
    with pytest.raises(NotImplementedError, match="forward-mode AD nested"):
        jacfwd(jacfwd(lambda z: sk.logsumexp(z, 1, backend=backend)))(x)


def test_weight_that_requires_grad_raises_as_torch(backend):
    x = torch.randn(3, 5, requires_grad=True)
    w = torch.rand(5, requires_grad=True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        F.cross_entropy(x, TARGET, w).backward()
    with pytest.raises(RuntimeError, match="not differentiable with respect to the class"):
        sk.cross_entropy(x, TARGET, w, backend=backend).backward()
