"""The backend contract: every backend is one checked Kernels record, support answers carry
their reason, the kernel ops of the extension trace under fake tensors, and the backend
modules import on their own (no import circle)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import stablekernels as sk
from stablekernels import _api as sk_api
from stablekernels import backends
from stablekernels.ops import _checks as sk_checks

from .conftest import CPU_BACKENDS, SUBPROCESS_TIMEOUT_S

EXTENSION_BUILT = bool(backends.EXTENSION)


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_each_available_backend_loads_one_record_meeting_the_contract(name):
    kernels = backends.BACKENDS[name].kernels()
    assert isinstance(kernels, backends.Kernels)
    for field in dataclasses.fields(backends.Kernels):
        kernel = getattr(kernels, field.name)
        if kernel is None:  # an optional kernel (a fused path some backends add)
            assert field.default is None and field.name != "masked_softmax", field.name
            continue
        assert backends.argument_names(kernel) == backends.KERNEL_ARGUMENTS[field.name]


def test_a_record_whose_kernel_takes_other_arguments_is_refused():
    good = backends.BACKENDS["torch"].kernels()

    def softmax(x, dim, out_dtype, log):  # the contract names it `dtype`
        return good.softmax(x, dim, out_dtype, log)

    with pytest.raises(TypeError, match=r"backend 'mine': kernel softmax takes"):
        backends.check_kernels("mine", dataclasses.replace(good, softmax=softmax))
    with pytest.raises(TypeError, match="not Kernels"):
        backends.check_kernels("mine", object())


def test_support_is_truthy_or_falsy_with_the_reason():
    yes = backends.BACKENDS["torch"].supports("cpu")
    assert yes and yes.reason is None
    no = backends.BACKENDS["cuda"].supports("cpu")
    assert not no
    assert "CUDA tensors only" in no.reason


@pytest.mark.parametrize(
    "module",
    [
        "stablekernels.backends.torch_ce",
        "stablekernels.backends.torch_ref",
        "stablekernels._numerics",
        "stablekernels.ops._library",
        "stablekernels.ops.softmax",
    ],
)
def test_each_module_imports_first_in_a_fresh_interpreter(module):
    # An import circle shows as an ImportError when one of its modules is imported first.
    result = subprocess.run(
        [sys.executable, "-c", f"import {module}"],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr


# The private kernel ops of the extension, with arguments meeting their preconditions.
def _fused_calls():
    x = torch.randn(3, 5)
    y = torch.softmax(x, -1)
    target = torch.tensor([0, 4, 2])
    weight = torch.rand(5)
    rows = torch.randn(3)
    terms = torch.randn(3, 5)
    counts = torch.tensor([2.0, 2.0, 5.0], dtype=torch.float64)
    ops = torch.ops.stablekernels
    return [
        (ops._fused_softmax.default, (x, 1, torch.float32, False)),
        (ops._fused_softmax.default, (x, 0, torch.float64, True)),
        (ops._fused_softmax_backward.default, (torch.randn(3, 5), y, 1, torch.float32, False)),
        (ops._fused_logsumexp.default, (x, 1, True)),
        (ops._fused_logsumexp_backward.default, (rows, x, rows.double(), 1)),
        (
            ops._fused_logsumexp_backward.default,
            (torch.ones(()).expand(5), x, torch.randn(5, dtype=torch.float64), 0),
        ),
        (ops._fused_cross_entropy.default, (x, target, weight, True)),
        (ops._fused_cross_entropy_backward.default, (x, target, weight, terms)),
        *[
            (ops._fused_cross_entropy_loss.default, (x, target, w, 4, 0.1, 0.01, reduction))
            for reduction in ("none", "mean", "sum")
            for w in (None, weight)
        ],
        (
            ops._fused_cross_entropy_loss_backward.default,
            (torch.randn(3), None, x, target, weight, rows.double(), counts, 4, 0.1, 0.01, "none"),
        ),
        (
            ops._fused_cross_entropy_loss_backward.default,
            (
                torch.randn(()),
                rows.double(),
                x,
                target,
                None,
                rows.double(),
                counts,
                4,
                0.0,
                0.0,
                "mean",
            ),
        ),
    ]


@pytest.mark.skipif(not EXTENSION_BUILT, reason="the compiled extension is not built")
@pytest.mark.parametrize("case", range(16))
def test_fused_ops_have_fake_kernels_that_match_the_real_ones(case):
    op, args = _fused_calls()[case]
    results = torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    assert set(results.values()) == {"SUCCESS"}, results


@pytest.mark.skipif(not EXTENSION_BUILT, reason="the compiled extension is not built")
def test_a_direct_call_of_a_fused_op_compiles_without_a_break():
    def f(x):
        return torch.ops.stablekernels._fused_softmax(x, 1, torch.float32, True) * 2

    x = torch.randn(4, 9)
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), torch.log_softmax(x, 1) * 2)
    with FakeTensorMode():
        fake = torch.ops.stablekernels._fused_logsumexp(torch.empty(2, 6), 1, False)
    assert [tuple(t.shape) for t in fake] == [(2,), (2,)]
    assert fake[1].dtype == torch.float64


def test_the_router_establishes_the_kernel_preconditions_for_odd_inputs():
    # 0-dim, empty and expanded inputs reach no kernel in a form it would have to re-handle:
    # the results match torch on every CPU backend.
    for name in CPU_BACKENDS:
        zero_dim = torch.tensor(3.0)
        torch.testing.assert_close(sk.softmax(zero_dim, 0, backend=name), torch.tensor(1.0))
        empty = torch.empty(0, 4)
        assert sk.logsumexp(empty, 0, backend=name).tolist() == [float("-inf")] * 4
        x = torch.randn(3, 4, requires_grad=True)
        sk.log_softmax(x, 1, backend=name).sum().backward()  # sum's grad is expanded
        torch.testing.assert_close(x.grad, torch.zeros(3, 4) - torch.softmax(x, 1) * 4 + 1)


def test_a_triton_that_fails_to_import_is_passed_over_with_one_warning(monkeypatch):
    """An installed triton whose import fails: the backend is unavailable with the cause
    (backend='triton' raises BackendUnavailableError naming it), one warning says so, and the
    automatic choice takes the next backend of its order."""
    if not backends._TRITON_INSTALLED:
        pytest.skip("triton is not installed")

    def broken():
        raise ImportError("libcuda.so.1: cannot open shared object file")

    monkeypatch.setattr(backends, "_import_triton_backend", broken)
    monkeypatch.setattr(backends, "_TRITON_IMPORTS", [])
    monkeypatch.setattr(backends, "_SERVES", {})
    monkeypatch.setattr(backends, "_AUTOMATIC", {})
    # The answers kept from earlier calls in this process (the served pairs' kernels and the
    # prepared checks), which would skip the support check.
    monkeypatch.setattr(sk_checks, "_SERVED", {})
    monkeypatch.setattr(sk_api, "_PREPARED", {})
    monkeypatch.setattr(backends, "TRITON_INTERPRETER", True)  # triton would serve CPU tensors
    monkeypatch.setitem(backends.AUTO_ORDER, "cpu", ("triton", "torch"))
    x = torch.randn(3, 5)
    with pytest.warns(RuntimeWarning, match="libcuda.so.1") as warned:
        assert backends.automatic_backend(x.device) == "torch"
        torch.testing.assert_close(sk.softmax(x, -1), torch.softmax(x, -1))
        with pytest.raises(backends.BackendUnavailableError, match="failed to import.*libcuda"):
            sk.softmax(x, -1, backend="triton")
    assert len([w for w in warned if "libcuda" in str(w.message)]) == 1
