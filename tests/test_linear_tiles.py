"""The linear cross-entropy's tile epilogues (``cross_entropy_tile`` and
``cross_entropy_tile_backward`` of the backend contract; csrc/include/stablekernels/
linear_tiles.h) on every CPU backend: the running per-row state over many tiles against the
float64 formulas (targets on tile edges, class weights, smoothing, softcap, temperature,
entropy, infinite logits), the backward map, the op through them with half inputs, the path
of a backend without them, and the launches per tile (cpp, counted as
benchmarks/overhead.py counts them)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import stablekernels as sk
from stablekernels import _linear_tiles, backends
from stablekernels.backends import torch_tiles

from .conftest import CPU_BACKENDS

OPTIONS = {
    "plain": {},
    "softcap": {"softcap": 3.0, "temperature": 1.3},
    "temperature": {"temperature": 0.7},
    "weight+smoothing": {"weight": True, "smoothing": True},
    "entropy": {"entropy": True},
    "everything": {"weight": True, "smoothing": True, "entropy": True, "softcap": 2.5},
}


def _kernels(backend):
    kernels = backends.get_backend(backend).kernels()
    if kernels.cross_entropy_tile is None:
        pytest.skip(f"{backend} has no tile epilogues")
    return kernels


def _reference(y, target, weight, softcap, temperature):
    """(nll, smooth, lse, H) per row in float64 of raw logits y: the definitions."""
    z = y.double() / temperature
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    lse = torch.logsumexp(z, 1)
    w = torch.ones(z.shape[1], dtype=torch.float64) if weight is None else weight.double()
    logp = z - lse[:, None]
    p = logp.exp()
    entropy = -(torch.where(p > 0, p * logp, 0.0)).sum(1)
    return -logp.gather(1, target[:, None])[:, 0], -(w * logp).sum(1), lse, entropy


def _run_tiles(kernels, y, target, weight, width, options):
    """The state after every tile of width ``width`` of y (the last one narrower)."""
    rows, vocab = y.shape
    state = torch.full((rows, torch_tiles.STATE_FIELDS), float("nan"), dtype=torch.float64)
    for start in range(0, vocab, width):
        kernels.cross_entropy_tile(
            y[:, start : start + width].contiguous(), target, start, weight,
            options.get("softcap"), options.get("temperature", 1.0),
            bool(options.get("smoothing")), bool(options.get("entropy")), state,
        )  # fmt: skip
    return state


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_the_state_after_many_tiles_holds_the_rows_pieces(backend, options, dtype):
    kernels = _kernels(backend)
    opts = OPTIONS[options]
    g = torch.Generator().manual_seed(1)
    rows, vocab, width = 11, 53, 8  # 7 tiles, the last of 5 classes
    y = (torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 4).to(dtype)
    y[2, 17] = 40.0  # a dominant class in a middle tile
    target = torch.randint(0, vocab, (rows,), generator=g)
    target[:6] = torch.tensor([0, 7, 8, 15, 48, 52])  # tile edges, the last class
    target[2] = 17
    weight = (torch.rand(vocab, generator=g) + 0.5).to(dtype) if opts.get("weight") else None
    state = _run_tiles(kernels, y, target, weight, width, opts)
    nll, smooth, lse, entropy = _reference(
        y, target, weight, opts.get("softcap"), opts.get("temperature", 1.0)
    )
    tol = {"rtol": 2e-6, "atol": 2e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(state[:, 8], lse, **tol)
    torch.testing.assert_close(state[:, 6], nll, **tol)
    if opts.get("smoothing"):
        torch.testing.assert_close(state[:, 7], smooth, **tol)
    else:
        assert (state[:, 7] == 0).all()
    if opts.get("entropy"):
        torch.testing.assert_close(state[:, 9], entropy, **tol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_confident_row_keeps_relative_precision_across_tiles(backend):
    """logits [0, -20, -20, ...] spread over tiles, target 0: nll about 20 e^-20 (2.06e-9
    per other class), kept to a few ulps although every tile but the first is negligible."""
    kernels = _kernels(backend)
    y = torch.full((1, 12), -20.0)
    y[0, 0] = 0.0
    target = torch.tensor([0])
    state = _run_tiles(kernels, y, target, None, 5, {"entropy": True})
    nll, _, _, entropy = _reference(y, target, None, None, 1.0)
    torch.testing.assert_close(state[:, 6], nll, rtol=1e-5, atol=0)
    torch.testing.assert_close(state[:, 9], entropy, rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_infinite_logits_in_tiles(backend):
    """A tile of only -inf beside finite ones leaves the row finite; a row of only -inf has
    lse -inf and a NaN entropy; a +inf gives lse +inf; smoothing sees a -inf as +inf."""
    kernels = _kernels(backend)
    y = torch.randn(3, 12)
    y[0, 4:8] = float("-inf")  # the whole second tile
    y[1, :] = float("-inf")
    y[2, 9] = float("inf")
    target = torch.tensor([1, 2, 3])
    state = _run_tiles(kernels, y, target, None, 4, {"entropy": True})
    finite = y[0, torch.arange(12) < 4].tolist() + y[0, 8:].tolist()
    ref = _reference(torch.tensor([finite]), target[:1], None, None, 1.0)
    torch.testing.assert_close(state[0, 8], ref[2][0], rtol=2e-6, atol=0)
    torch.testing.assert_close(state[0, 9], ref[3][0], rtol=2e-6, atol=0)
    assert state[1, 8] == float("-inf") and state[1, 9].isnan()
    assert state[2, 8] == float("inf") and state[2, 9].isnan()
    smoothing = _run_tiles(kernels, y[:1], target[:1], None, 4, {"smoothing": True})
    assert smoothing[0, 7] == float("inf")


def _backward_reference(y, target, class_start, weight, terms, softcap, temperature, g_h):
    z = y.double() / temperature
    t = None
    if softcap is not None:
        t = torch.tanh(z / softcap)
        z = softcap * t
    hi, lo, coef, smooth, one_hot = (c[:, None].double() for c in terms.unbind(1))
    shifted = (z - hi) - lo
    p = shifted.exp()
    w = 1.0 if weight is None else weight[class_start : class_start + y.shape[1]].double()
    local = (target - class_start)[:, None]
    columns = torch.arange(y.shape[1])
    dz = p * coef - smooth * w - torch.where(columns == local, one_hot, 0.0)
    if g_h is not None:
        dz -= p * shifted * g_h[:, None].double()
    if t is not None:
        dz *= 1 - t * t
    return dz / temperature


@pytest.mark.parametrize("options", ["plain", "softcap", "everything"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_the_backward_overwrites_each_tile_with_its_gradient(backend, options):
    kernels = _kernels(backend)
    opts = OPTIONS[options]
    g = torch.Generator().manual_seed(2)
    rows, vocab, width = 9, 30, 7
    y = torch.randn(rows, vocab, generator=g) * 3
    target = torch.tensor([0, 6, 7, 13, 14, 29, 28, 3, 21])
    weight = torch.rand(vocab, generator=g) + 0.5 if opts.get("weight") else None
    softcap, temperature = opts.get("softcap"), opts.get("temperature", 1.0)
    lse = _reference(y, target, None, softcap, temperature)[2]
    hi = lse.float()
    lo = (lse - hi.double()).float()
    terms = torch.stack([hi, lo, *torch.rand(3, rows, generator=g)], 1).contiguous()
    g_h = torch.randn(rows, generator=g) if opts.get("entropy") else None
    for start in range(0, vocab, width):
        tile = y[:, start : start + width].contiguous()
        expected = _backward_reference(tile, target, start, weight, terms, softcap, temperature,
                                       g_h)  # fmt: skip
        kernels.cross_entropy_tile_backward(
            tile, target, start, weight, terms, softcap, temperature, g_h
        )
        torch.testing.assert_close(tile.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_half_inputs_through_the_tiles(backend, dtype, monkeypatch):
    """fp16/bf16 x and W: each tile's W converted to fp32 once, the epilogues in fp32; the
    loss, entropy and gradients against float64 from the same half values."""
    monkeypatch.setattr(_linear_tiles, "TILE_ELEMENTS", 64)
    monkeypatch.setattr(_linear_tiles, "MIN_CHUNK_ROWS", 2)
    monkeypatch.setattr(_linear_tiles, "USE_FUSED_FORWARD", False)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, 8, generator=g).to(dtype)
    w = torch.randn(41, 8, generator=g).to(dtype)
    target = torch.randint(0, 41, (10,), generator=g)
    target[4] = -100
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss, entropy = sk.linear_cross_entropy(
        xs, ws, target, label_smoothing=0.1, softcap=4.0, return_entropy=True, backend=backend
    )
    (loss + entropy.sum()).backward()
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    z = 4.0 * torch.tanh(F.linear(x64, w64) / 4.0)
    ref = F.cross_entropy(z, target, label_smoothing=0.1)
    logp = z.log_softmax(1)
    ref_entropy = -(logp.exp() * logp).sum(1)
    (ref + ref_entropy.sum()).backward()
    # the loss rounded once to the input's dtype; the entropy in float32
    half_eps = torch.finfo(dtype).eps
    torch.testing.assert_close(loss.double(), ref, rtol=half_eps, atol=0)
    torch.testing.assert_close(entropy.double(), ref_entropy, rtol=1e-5, atol=1e-5)
    tol = {"rtol": 1e-2, "atol": 1e-2}  # the gradients rounded to the half dtype
    torch.testing.assert_close(xs.grad.double(), x64.grad, **tol)
    torch.testing.assert_close(ws.grad.double(), w64.grad, **tol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_backend_without_the_epilogues_takes_the_old_path_to_the_same_values(backend):
    """_linear_tiles with the record's tile epilogues removed (the path of a backend that has
    none) gives what the epilogues give, forward and backward."""
    kernels = _kernels(backend)
    without = dataclasses.replace(
        kernels, cross_entropy_tile=None, cross_entropy_tile_backward=None
    )
    g = torch.Generator().manual_seed(4)
    x, w, b = torch.randn(12, 6, generator=g), torch.randn(50, 6, generator=g), torch.randn(50)
    target = torch.randint(0, 50, (12,), generator=g)
    counted = torch.ones(12, dtype=torch.bool)
    counted[5] = False
    target[5] = 0
    class_weight = torch.rand(50, generator=g) + 0.5
    logits = _linear_tiles.Logits(w, b, 3.0, 0.8, torch.float32)
    g_entropy = torch.rand(12, generator=g)
    old = _linear_tiles.USE_FUSED_FORWARD
    _linear_tiles.USE_FUSED_FORWARD = False
    try:
        results = []
        for record in (kernels, without):
            pieces = _linear_tiles.forward(record, x, logits, target, counted, class_weight, True,
                                           True)  # fmt: skip
            terms = torch.rand(12, 5, generator=torch.Generator().manual_seed(5))
            terms[:, 0], terms[:, 1] = pieces[2].float(), 0.0
            grads = _linear_tiles.backward(record, x, logits, target, counted, class_weight,
                                           terms, g_entropy)  # fmt: skip
            results.append([*pieces, *grads])
    finally:
        _linear_tiles.USE_FUSED_FORWARD = old
    # (the nll of a row that does not count is not read: the router zeroes its loss)
    results[0][0], results[1][0] = results[0][0][counted], results[1][0][counted]
    for new, before in zip(*results, strict=True):
        torch.testing.assert_close(new.double(), before.double(), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------
# Launches per tile (cpp), counted as benchmarks/overhead.py counts them.


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="the extension is not built")
@pytest.mark.parametrize("direction", ["no_grad", "forward+backward"])
def test_each_tile_is_its_matmul_and_one_epilogue_kernel(direction, monkeypatch):
    """At 64 x 32 x 1000 with row chunks of 32 rows: vocabulary tiles of 100 classes (20
    tiles) against tiles of 200 (10): each tile more costs exactly its matmul's launches
    plus one epilogue kernel (forward: ``cross_entropy_tile``; backward: the recompute
    matmul, ``cross_entropy_tile_backward`` and the gradient's two matmuls), nothing per
    tile around them; no host read-back but the CPU target checks, asynchronous on CUDA."""
    from benchmarks import overhead

    torch.manual_seed(0)
    x, w = torch.randn(64, 32), torch.randn(1000, 32) * 0.1
    t = torch.randint(0, 1000, (64,))
    xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
    # With a gradient and a mean loss the forward computes it as it goes (one tile per row
    # chunk); with return_lse the backward takes the vocabulary tiles.

    def call():
        if direction == "no_grad":
            with torch.no_grad():
                sk.linear_cross_entropy(x, w, t, backend="cpp")
        else:
            loss, lse = sk.linear_cross_entropy(xl, wl, t, backend="cpp", return_lse=True)
            (loss + lse.sum()).backward()
            xl.grad = wl.grad = None

    def counted(tile_elements):
        monkeypatch.setattr(_linear_tiles, "TILE_ELEMENTS", tile_elements)
        assert _linear_tiles._steps(64, 32, 1000) == (32, tile_elements // 32)
        call()
        row = overhead.Row("linear_cross_entropy", direction, "64x32x1000", "sk-cpp")
        overhead.count_ops(call, row)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            call()
        matmuls = sum(e.name in MATMULS for e in prof.events())
        return row, matmuls

    (many, many_mm), (few, few_mm) = counted(3200), counted(6400)  # 20 tiles, 10 tiles
    extra = 10
    kernels = ["stablekernels::_fused_cross_entropy_tile"]
    if direction != "no_grad":
        kernels.append("stablekernels::_fused_cross_entropy_tile_backward")
    for name in kernels:
        assert many.leaf_ops[name] - few.leaf_ops[name] == extra, many.leaf_ops
    # the forward's matmul; with the backward also its recomputed logits, dx and dW
    assert many_mm - few_mm == extra * (1 if direction == "no_grad" else 4)
    # A matmul shows in the counts as its leaves (resolve_conj, a no-op the profiler sees
    # inside at::mm, 2 or 3 by the operands' layout): every other launch a tile more brings
    # is one of the epilogue kernels.
    conj = "aten::resolve_conj"
    extra_launches = many.launches - few.launches
    assert extra_launches == many.leaf_ops[conj] - few.leaf_ops[conj] + extra * len(kernels), (
        many.leaf_ops,
        few.leaf_ops,
    )
    # No read-back per tile or chunk: only the target check of each op call (the forward's,
    # and the backward op's), an IndexError on the CPU and torch._assert_async on CUDA
    assert many.syncs == few.syncs == (1 if direction == "no_grad" else 2), many.leaf_ops


MATMULS = ("aten::mm", "aten::addmm", "aten::addmm_")


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="the extension is not built")
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_the_epilogue_ops_have_fake_kernels_that_match_the_real_ones(direction):
    """The extension's ops: schema (what they mutate) and fake kernel. (The triton ops'
    fakes are their launchers' own, which the interpreter cannot run on fake tensors;
    tools/triton_launches.py runs them on fake CUDA tensors.)"""
    ops = torch.ops.stablekernels
    y, target = torch.randn(3, 5), torch.tensor([0, 7, 4])
    weight, terms = torch.rand(8), torch.rand(3, 5)
    if direction == "forward":
        op = ops._fused_cross_entropy_tile.default
        args = (y, target, 3, weight, 2.0, 0.9, True, True, torch.zeros(3, 10, dtype=torch.float64))
    else:
        op = ops._fused_cross_entropy_tile_backward.default
        args = (y, target, 3, weight, terms, 2.0, 0.9, torch.randn(3))
    results = torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    assert set(results.values()) == {"SUCCESS"}, results
