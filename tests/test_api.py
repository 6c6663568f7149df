"""The public API: signatures, torch's exception types for bad input, modules, and the
backend registry and its resolution rules."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import threading

import pytest
import torch

import stablekernels as sk
from stablekernels import backends
from stablekernels._api import resolve_backend

CPU = torch.device("cpu")


def _shape_of(fn):
    """(name, kind, default) of each parameter."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def test_signatures_are_those_of_the_design():
    pos, kw = inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY
    attention = [  # docs/masked_softmax.md
        ("scale", kw, None),
        ("mask", kw, None),
        ("causal", kw, False),
        ("causal_offset", kw, 0),
        ("masked_rows", kw, "zero"),
    ]
    softmax_like = [
        ("x", pos, inspect.Parameter.empty),
        ("dim", pos, -1),
        ("dtype", kw, None),
        *attention,
        ("backend", kw, None),
    ]
    assert _shape_of(sk.softmax) == softmax_like
    assert _shape_of(sk.log_softmax) == softmax_like
    assert _shape_of(sk.logsumexp) == [
        ("x", pos, inspect.Parameter.empty),
        ("dim", pos, -1),
        ("keepdim", pos, False),
        *attention,
        ("backend", kw, None),
    ]


# ----------------------------------------------------------------------------------------
# Bad input: the exception types torch raises.


@pytest.mark.parametrize("name", ["softmax", "log_softmax", "logsumexp"])
@pytest.mark.parametrize("dim", [2, -3, 7])
def test_bad_dim_is_index_error(backend, name, dim):
    x = torch.randn(3, 4)
    with pytest.raises(IndexError):
        getattr(torch, name)(x, dim)
    with pytest.raises(IndexError, match="Dimension out of range"):
        getattr(sk, name)(x, dim, backend=backend)


@pytest.mark.parametrize("name", ["softmax", "log_softmax", "logsumexp"])
def test_bad_dim_on_zero_dim_tensor(backend, name):
    with pytest.raises(IndexError):
        getattr(sk, name)(torch.tensor(1.0), 1, backend=backend)


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_softmax_without_dtype_raises_runtime_error(backend, name, dtype):
    x = torch.ones(3, dtype=dtype)
    with pytest.raises(RuntimeError):
        getattr(torch, name)(x, 0)
    with pytest.raises(RuntimeError, match="dtype="):
        getattr(sk, name)(x, 0, backend=backend)


@pytest.mark.parametrize("name", ["softmax", "log_softmax", "logsumexp"])
@pytest.mark.parametrize("value", [[1.0, 2.0], 3.0, None, "x"])
def test_non_tensor_input_is_type_error(name, value):
    with pytest.raises(TypeError):
        getattr(torch, name)(value, 0)
    with pytest.raises(TypeError, match="must be Tensor"):
        getattr(sk, name)(value, 0)


@pytest.mark.parametrize("name", ["softmax", "log_softmax", "logsumexp"])
@pytest.mark.parametrize("dim", [0.5, None, "0"])
def test_non_integer_dim_is_type_error(name, dim):
    with pytest.raises(TypeError, match="dim"):
        getattr(sk, name)(torch.randn(3), dim)


@pytest.mark.parametrize("dtype", [torch.int32, "float32", float])
def test_bad_dtype_argument(dtype):
    with pytest.raises((TypeError, RuntimeError)):
        sk.softmax(torch.randn(3), 0, dtype=dtype)


def test_duplicate_logsumexp_dims_is_runtime_error():
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError):
        torch.logsumexp(x, (0, 0))
    with pytest.raises(RuntimeError, match="multiple times"):
        sk.logsumexp(x, (0, -2))


def test_empty_dim_list_on_a_tensor_with_dims_raises_as_torch():
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError):
        torch.logsumexp(x, ())
    with pytest.raises(RuntimeError, match="dim"):
        sk.logsumexp(x, ())


def test_complex_input_is_refused_by_name():
    x = torch.randn(3, dtype=torch.complex64)
    with pytest.raises(NotImplementedError, match="complex"):
        sk.logsumexp(x)
    with pytest.raises(RuntimeError):
        sk.softmax(x)


def test_tensors_on_different_devices_are_refused():
    y = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="one device"):
        torch.ops.stablekernels.softmax_backward(
            torch.randn(3, 4, device="meta"), y, 1, torch.float32, "torch"
        )


def test_backward_grad_of_wrong_shape_is_refused():
    with pytest.raises(RuntimeError, match="shape"):
        torch.ops.stablekernels.softmax_backward(
            torch.randn(3, 5), torch.randn(3, 4), 1, torch.float32, "torch"
        )


# ----------------------------------------------------------------------------------------
# nn modules and the naive formulas' plumbing.


def test_nn_modules(backend):
    x = torch.randn(4, 9, 3)
    torch.testing.assert_close(sk.nn.Softmax(1, backend=backend)(x), torch.softmax(x, 1))
    torch.testing.assert_close(sk.nn.LogSoftmax(-1)(x), torch.log_softmax(x, -1))
    assert repr(sk.nn.Softmax(1)) == "Softmax(dim=1)"
    assert repr(sk.nn.LogSoftmax(0, backend="torch")) == "LogSoftmax(dim=0, backend='torch')"
    with pytest.raises(TypeError):
        sk.nn.Softmax()


# ----------------------------------------------------------------------------------------
# The backend registry.


def test_available_backends():
    names = sk.available_backends()
    assert "torch" in names
    assert set(names) <= set(backends.BACKENDS) == {"torch", "cpp", "cuda", "triton"}
    for name in names:
        assert any(backends.BACKENDS[name].supports(t) for t in backends.local_device_types())


def test_unknown_backend_is_value_error():
    x = torch.randn(3)
    with pytest.raises(ValueError, match="known backends"):
        sk.softmax(x, backend="numpy")
    with pytest.raises(ValueError, match="numpy"):
        with sk.use_backend("numpy"):
            pass


def test_cuda_backend_refuses_cpu_tensors_naming_backend_device_and_reason():
    with pytest.raises(sk.BackendUnavailableError) as info:
        sk.softmax(torch.randn(3), backend="cuda")
    message = str(info.value)
    assert "'cuda'" in message and "'cpu'" in message and "CUDA tensors only" in message
    assert isinstance(info.value, RuntimeError)


@pytest.mark.parametrize("name", [n for n in backends.BACKENDS if n not in sk.available_backends()])
def test_unavailable_backends_raise_when_asked_for(name):
    with pytest.raises(sk.BackendUnavailableError, match=name):
        sk.logsumexp(torch.randn(3), backend=name)
    with sk.use_backend(name), pytest.raises(sk.BackendUnavailableError, match=name):
        sk.logsumexp(torch.randn(3))


def test_automatic_choice_on_cpu():
    expected = "cpp" if "cpp" in sk.available_backends() else "torch"
    assert resolve_backend(None, CPU) == expected
    assert resolve_backend(None, torch.device("meta")) == "torch"


def test_use_backend_nests_and_explicit_argument_wins():
    auto = resolve_backend(None, CPU)
    with sk.use_backend("torch"):
        assert resolve_backend(None, CPU) == "torch"
        with sk.use_backend("cuda"):
            assert pytest.raises(sk.BackendUnavailableError, resolve_backend, None, CPU)
            assert resolve_backend("torch", CPU) == "torch"
        assert resolve_backend(None, CPU) == "torch"
    assert resolve_backend(None, CPU) == auto


def test_use_backend_is_per_thread():
    seen = []
    with sk.use_backend("cuda"):
        thread = threading.Thread(target=lambda: seen.append(resolve_backend(None, CPU)))
        thread.start()
        thread.join()
    assert seen == [resolve_backend(None, CPU)]


def _run_with_env(value: str, code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, STABLEKERNELS_BACKEND=value)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def test_environment_variable_overrides_the_default():
    code = (
        "import torch, stablekernels as sk\n"
        "from stablekernels._api import resolve_backend\n"
        "print(resolve_backend(None, torch.device('cpu')))\n"
        "sk.softmax(torch.randn(3))\n"
    )
    ok = _run_with_env("torch", code)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "torch"
    refused = _run_with_env("cuda", code)
    assert refused.returncode != 0 and "BackendUnavailableError" in refused.stderr
    unknown = _run_with_env("fortran", code)
    assert unknown.returncode != 0
    assert "ValueError" in unknown.stderr and "STABLEKERNELS_BACKEND" in unknown.stderr
