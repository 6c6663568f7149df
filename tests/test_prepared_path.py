"""The prepared path of eager calls that need autograd (stablekernels._api,
ops._library.apply_prepared): the forward goes straight to the backend's kernel through the
op's own autograd.Function, and a first-order backward to the backward kernel. It must give
the bits of the general path (the op through the dispatcher), keep double backward, and
leave every case it does not cover to the op's own rules."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import stablekernels as sk
from stablekernels.ops import logsumexp as logsumexp_ops
from stablekernels.ops import softmax as softmax_ops

from .conftest import CPU_BACKENDS


class _GeneralPath(TorchFunctionMode):
    """A mode that changes nothing but is seen by ops._library.direct: every call inside takes
    the general path through the op."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _calls(x, t):
    w = torch.rand(x.shape[-1], dtype=x.dtype)
    return {
        "softmax": lambda x: sk.softmax(x, -1),
        "log_softmax": lambda x: sk.log_softmax(x, 0, dtype=torch.float64),
        "logsumexp": lambda x: sk.logsumexp(x, 1, keepdim=True),
        "cross_entropy": lambda x: sk.cross_entropy(x, t),
        "cross_entropy_none": lambda x: sk.cross_entropy(x, t, reduction="none"),
        "cross_entropy_options": lambda x: sk.cross_entropy(
            x, t, w, ignore_index=3, label_smoothing=0.1, z_loss=1e-3, reduction="sum"
        ),
        "cross_entropy_lse": lambda x: (lambda r: r[0] + r[1].sum())(
            sk.cross_entropy(x, t, return_lse=True)
        ),
    }


CALLS = list(_calls(torch.zeros(1, 1), torch.zeros(1, dtype=torch.long)))


def _value_and_gradient(call, x, general: bool):
    leaf = x.clone().requires_grad_()
    if general:
        with _GeneralPath():
            out = call(leaf)
            out.backward(torch.ones_like(out))
    else:
        out = call(leaf)
        out.backward(torch.ones_like(out))
    return out.detach(), leaf.grad


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", CALLS)
def test_prepared_and_general_paths_give_the_same_bits(backend, dtype, name):
    torch.manual_seed(0)
    x = torch.randn(6, 11, dtype=dtype) * 4
    t = torch.randint(0, 11, (6,))
    t[2] = 3  # an ignored row where ignore_index is 3
    call = _calls(x, t)[name]
    with sk.use_backend(backend):
        fast = _value_and_gradient(call, x, general=False)
        general = _value_and_gradient(call, x, general=True)
    for a, b in zip(fast, general, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


def _spy_on_backward_ops(monkeypatch, module) -> list[str]:
    """The names of the ops that the autograd rules of ``module`` call (its ``call_op``): the
    general path's backward calls its backward op there; the eager vjp does not."""
    seen = []
    call_op = module.call_op

    def spy(name, *args):
        seen.append(name)
        return call_op(name, *args)

    monkeypatch.setattr(module, "call_op", spy)
    return seen


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_first_order_backward_of_a_prepared_forward_skips_the_backward_router(
    backend, monkeypatch
):
    """The eager vjp calls the backward kernel itself; with create_graph (a backward that
    needs autograd) the op's own differentiable backward op runs, and double backward
    matches the general path's."""
    seen = _spy_on_backward_ops(monkeypatch, softmax_ops)
    x = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    sk.softmax(x, -1, backend=backend).pow(2).sum().backward()
    assert seen == []

    def second(general: bool):
        leaf = x.detach().clone().requires_grad_()
        with _GeneralPath() if general else torch.enable_grad():
            y = sk.softmax(leaf, -1, backend=backend)
            (g,) = torch.autograd.grad(y.pow(3).sum(), leaf, create_graph=True)
            (gg,) = torch.autograd.grad(g.sin().sum(), leaf)
        return g.detach(), gg

    fast, general = second(False), second(True)
    assert seen, "create_graph=True ran no differentiable backward op"
    for a, b in zip(fast, general, strict=True):
        assert torch.equal(a, b)


class _SeeingDispatch(TorchDispatchMode):
    """A dispatch mode that changes nothing (open at backward time, autograd's backward
    runs under it, as it does not under a torch-function mode)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_a_backward_under_a_mode_takes_the_general_path(monkeypatch):
    """A dispatch mode open at backward time (not at forward time) sees the backward op: the
    eager vjp steps aside when ops._library.direct refuses the gradients."""
    seen = _spy_on_backward_ops(monkeypatch, logsumexp_ops)
    x = torch.randn(4, 7, requires_grad=True)
    out = sk.logsumexp(x, -1, backend="torch")
    with _SeeingDispatch():
        out.sum().backward()
    assert seen == ["logsumexp_backward"]
    torch.testing.assert_close(x.grad, torch.softmax(x.detach(), -1))
