"""The custom ops: schemas, torch.library.opcheck on every op, and torch.compile with
fullgraph=True (no graph break, same values, gradients through the compiled graph)."""

from __future__ import annotations

import pytest
import torch

import stablekernels as sk
from stablekernels.ops._library import SCHEMAS

ops = torch.ops.stablekernels


def test_every_op_is_registered_with_its_schema():
    for name, schema in SCHEMAS.items():
        op = getattr(ops, name).default
        assert str(op._schema) == f"stablekernels::{schema}"


def _forward_samples(backend):
    x = torch.randn(4, 37, requires_grad=True)
    t = torch.randn(9, 5).t().requires_grad_()
    h = torch.randn(3, 130, dtype=torch.float16, requires_grad=True)
    s = torch.randn((), dtype=torch.float64, requires_grad=True)
    e = torch.randn(3, 0, requires_grad=True)
    return [
        (ops.softmax.default, (x, -1, None, backend)),
        (ops.softmax.default, (t, 0, torch.float64, backend)),
        (ops.softmax.default, (h, 1, torch.float32, backend)),
        (ops.softmax.default, (s, 0, None, backend)),
        (ops.softmax.default, (e, 1, None, backend)),
        (ops.log_softmax.default, (x, 1, None, backend)),
        (ops.log_softmax.default, (t, -1, None, backend)),
        (ops.log_softmax.default, (h, 0, None, backend)),
        (ops.logsumexp.default, (x, 1, False, backend)),
        (ops.logsumexp.default, (t, 0, True, backend)),
        (ops.logsumexp.default, (h, -1, True, backend)),
        (ops.logsumexp.default, (s, 0, False, backend)),
        (ops.logsumexp.default, (e, 1, False, backend)),
    ]


def _backward_samples(backend):
    y = torch.softmax(torch.randn(4, 37, dtype=torch.float64), 1).requires_grad_()
    dy = torch.randn(4, 37, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 6, requires_grad=True)
    lse = torch.logsumexp(x.detach(), 0).requires_grad_()
    g = torch.randn(6, requires_grad=True)
    return [
        (ops.softmax_backward.default, (dy, y, 1, torch.float64, backend)),
        (ops.softmax_backward.default, (dy.float(), y.float(), 0, torch.float16, backend)),
        (ops.log_softmax_backward.default, (dy, y.log(), 1, torch.float64, backend)),
        (ops.logsumexp_backward.default, (g, x, lse, 0, False, backend)),
        (ops.logsumexp_backward.default, (g.unsqueeze(0), x, lse.unsqueeze(0), 0, True, backend)),
    ]


def test_opcheck_forward_ops(backend):
    for op, args in _forward_samples(backend):
        results = torch.library.opcheck(op, args)
        assert set(results.values()) == {"SUCCESS"}, (op, results)


def test_opcheck_backward_ops(backend):
    for op, args in _backward_samples(backend):
        results = torch.library.opcheck(op, args)
        assert set(results.values()) == {"SUCCESS"}, (op, results)


def _model(x, backend):
    a = sk.softmax(x, -1, backend=backend)
    b = sk.log_softmax(x, 0, backend=backend)
    c = sk.logsumexp(x, -1, keepdim=True, backend=backend)
    d = sk.logsumexp(x, (0, 1), backend=backend)
    return a * b + c - d


def test_fullgraph_compile_gives_eager_values_and_gradients(backend):
    torch._dynamo.reset()
    compiled = torch.compile(_model, fullgraph=True)
    x = torch.randn(6, 300, requires_grad=True)
    expected = _model(x, backend)
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    got = compiled(x, backend)
    (got_grad,) = torch.autograd.grad(got.sum(), x)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got_grad, expected_grad)


def test_compiled_graph_contains_the_ops_and_no_break(backend):
    torch._dynamo.reset()
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(_model, backend=capture, fullgraph=True)
    compiled(torch.randn(4, 16), backend)
    assert len(graphs) == 1
    targets = {n.target for n in graphs[0].graph.nodes if n.op == "call_function"}
    for name in ("softmax", "log_softmax", "logsumexp"):
        packet = getattr(ops, name)
        assert packet in targets or packet.default in targets, name


def test_compile_with_automatic_backend_and_modules():
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), sk.nn.LogSoftmax(-1))
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    for rows in (3, 5):
        x = torch.randn(rows, 8)
        torch.testing.assert_close(compiled(x), model(x))


def test_compiled_function_follows_use_backend():
    # The backend choice is guarded: entering use_backend recompiles instead of reusing a
    # graph built for another backend. "cuda" cannot serve CPU tensors, so it must raise.
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: sk.softmax(t), fullgraph=True)
    x = torch.randn(3, 5)
    torch.testing.assert_close(compiled(x), torch.softmax(x, -1))
    with sk.use_backend("cuda"), pytest.raises(Exception, match="cuda"):
        compiled(x)
    with sk.use_backend("torch"):
        torch.testing.assert_close(compiled(x), torch.softmax(x, -1))


def test_torchscript_scripts_the_ops(backend):
    # The public functions are not scriptable (docs/transforms.md); the ops are.
    def scripted(x: torch.Tensor, backend: str) -> torch.Tensor:
        y = torch.ops.stablekernels.softmax(x, -1, None, backend)
        return y + torch.ops.stablekernels.logsumexp(x, -1, True, backend)[0]

    fn = torch.jit.script(scripted)
    x = torch.randn(3, 7)
    torch.testing.assert_close(fn(x, backend), torch.softmax(x, -1) + torch.logsumexp(x, -1, True))
