"""sk.linear_cross_entropy and sk.linear_logprobs against the naive formula
(F.linear, then F.cross_entropy) in float64, on every CPU backend, across vocabulary tiles;
their gradients, determinism, memory (no (rows x V) temporary), compile, opcheck, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import stablekernels as sk
from stablekernels import _linear_tiles, backends
from stablekernels.ops._library import ROUTERS, ops

from .bounds import assert_gradients_within, assert_within, linear_cross_entropy_bounds

OPTIONS = {
    "plain": {},
    "weight": {"weight": True},
    "smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-2},
    "everything": {"weight": True, "label_smoothing": 0.2, "z_loss": 1e-2},
    "temperature": {"temperature": 0.7},
    "softcap": {"softcap": 3.0, "temperature": 1.3},
}
REDUCTIONS = ("mean", "sum", "none")


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 64 elements, chunks of 2 rows: the shapes below cross many row chunks and
    vocabulary tiles."""
    monkeypatch.setattr(_linear_tiles, "TILE_ELEMENTS", 64)
    monkeypatch.setattr(_linear_tiles, "MIN_CHUNK_ROWS", 2)


def _problem(rows=13, hidden=7, vocab=37, dtype=torch.float64, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=g, dtype=dtype)
    w = torch.randn(vocab, hidden, generator=g, dtype=dtype)
    b = torch.randn(vocab, generator=g, dtype=dtype) if bias else None
    target = torch.randint(0, vocab, (rows,), generator=g)
    target[3 % rows] = -100
    class_weight = torch.rand(vocab, generator=g, dtype=torch.float64) + 0.5
    return x, w, b, target, class_weight


def _naive_logits(x, w, b, temperature=1.0, softcap=None):
    z = F.linear(x, w, b) / temperature
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def _naive_loss(
    x,
    w,
    b,
    target,
    reduction,
    weight=None,
    label_smoothing=0.0,
    z_loss=0.0,
    temperature=1.0,
    softcap=None,
):
    """The formula in float64: F.cross_entropy of the logits, plus the z-loss of
    sk.cross_entropy (z * lse^2 per counted row; its mean over the counted rows)."""
    z = _naive_logits(
        x.double(), w.double(), None if b is None else b.double(), temperature, softcap
    )
    loss = F.cross_entropy(
        z, target, weight=weight, label_smoothing=label_smoothing, reduction=reduction
    )
    if z_loss:
        counted = target != -100
        penalty = torch.where(counted, torch.logsumexp(z, -1), 0.0) ** 2
        if reduction == "none":
            loss = loss + z_loss * penalty
        elif reduction == "sum":
            loss = loss + z_loss * penalty.sum()
        else:
            loss = loss + z_loss * penalty.sum() / counted.sum()
    return loss


def _kwargs(option, class_weight):
    kw = dict(OPTIONS[option])
    if kw.pop("weight", False):
        kw["weight"] = class_weight
    return kw


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", OPTIONS)
def test_loss_and_gradients_match_the_float64_formula(backend, small_tiles, option, reduction):
    x, w, b, target, class_weight = _problem()
    kw = _kwargs(option, class_weight)
    leaves = [t.requires_grad_() for t in (x, w, b)]
    ours = sk.linear_cross_entropy(
        x, w, target, linear_bias=b, reduction=reduction, backend=backend, **kw
    )
    ref = _naive_loss(x, w, b, target, reduction, **kw)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    for a, r in zip(
        torch.autograd.grad(ours, leaves, g), torch.autograd.grad(ref, leaves, g), strict=False
    ):
        torch.testing.assert_close(a, r, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_is_computed_in_float32(backend, dtype):
    """Logits in fp32, never rounded to the half type: the loss of bf16/fp16 inputs is
    within the bound of fp32 arithmetic (in any summation order, then one rounding to the
    dtype; tests/bounds.py) of the float64 formula on the same (rounded) inputs, far closer
    than the naive formula in that dtype; the gradients too, elementwise."""
    x, w, b, target, _ = _problem(rows=64, hidden=32, vocab=300, dtype=dtype)
    leaves = [t.requires_grad_() for t in (x, w, b)]
    ours = sk.linear_cross_entropy(x, w, target, linear_bias=b, reduction="none", backend=backend)
    assert ours.dtype == dtype
    # the reference's leaves in float64: its gradients are not rounded to the dtype
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = _naive_loss(*ref_leaves, target, "none")
    g = torch.rand_like(ref).to(dtype)  # the gradient ours receives, also the reference's
    bounds = linear_cross_entropy_bounds(x, w, b, target, g)
    assert_within(ours, ref, bounds.loss, "loss")
    if dtype != torch.float32:
        naive = F.cross_entropy(F.linear(x, w, b), target, reduction="none")
        ours_err = (ours.double() - ref).abs().max().item()
        assert ours_err < (naive.double() - ref).abs().max().item()
    assert_gradients_within(
        torch.autograd.grad(ours, leaves, g),
        torch.autograd.grad(ref, ref_leaves, g.double()),
        bounds.grads,
        dtype,
    )


def test_mixed_dtypes_as_autocast_leaves_them(backend):
    """bf16 activations with fp32 weights: computed in fp32, each gradient in its tensor's
    dtype; the loss in the input's dtype, float32 under CPU autocast. Loss and gradients
    within the bounds of fp32 arithmetic in any summation order (tests/bounds.py)."""
    x, w, b, target, _ = _problem(rows=16, hidden=8, vocab=50, dtype=torch.float32)
    x = x.to(torch.bfloat16).requires_grad_()
    w.requires_grad_()
    loss = sk.linear_cross_entropy(x, w, target, linear_bias=b, backend=backend)
    assert loss.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_loss = sk.linear_cross_entropy(x, w, target, linear_bias=b, backend=backend)
    assert autocast_loss.dtype == torch.float32
    ref_x, ref_w = (t.detach().double().requires_grad_() for t in (x, w))
    ref = _naive_loss(ref_x, ref_w, b, target, "mean")
    bounds = linear_cross_entropy_bounds(
        x, w, b, target, torch.tensor(1.0), reduction="mean", loss_dtype=torch.float32
    )
    assert_within(autocast_loss, ref, bounds.loss, "loss")
    dx, dw = torch.autograd.grad(autocast_loss, (x, w))
    assert dx.dtype == torch.bfloat16 and dw.dtype == torch.float32
    ref_dx, ref_dw = torch.autograd.grad(ref, (ref_x, ref_w))  # float64, not rounded
    assert_within(dx, ref_dx, bounds.grads[0], "dx")
    assert_within(dw, ref_dw, bounds.grads[1], "dW")


@pytest.mark.parametrize("option", ["plain", "softcap"])
def test_lse_entropy_and_logprobs_match_the_float64_formula(backend, small_tiles, option):
    x, w, b, target, class_weight = _problem()
    kw = _kwargs(option, class_weight)
    loss, lse, entropy = sk.linear_cross_entropy(
        x,
        w,
        target,
        linear_bias=b,
        return_lse=True,
        return_entropy=True,
        backend=backend,
        **kw,
    )
    z = _naive_logits(x, w, b, **kw)
    logp = torch.log_softmax(z, -1)
    torch.testing.assert_close(lse, torch.logsumexp(z, -1), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(entropy, -(logp.exp() * logp).sum(-1), rtol=1e-12, atol=1e-13)
    logprob = sk.linear_logprobs(x, w, target, linear_bias=b, backend=backend, **kw)
    counted = target != -100
    expected = torch.where(counted, logp.gather(1, target.clamp(min=0)[:, None])[:, 0], 0.0)
    torch.testing.assert_close(logprob, expected, rtol=1e-13, atol=1e-13)


def test_gradcheck_of_every_output(backend, small_tiles):
    x, w, b, target, class_weight = _problem(rows=5, hidden=3, vocab=11)
    target[0] = -100

    def outputs(x, w, b):
        loss, lse, entropy = sk.linear_cross_entropy(
            x,
            w,
            target,
            linear_bias=b,
            weight=class_weight,
            label_smoothing=0.1,
            z_loss=1e-2,
            softcap=2.0,
            temperature=0.8,
            reduction="none",
            return_lse=True,
            return_entropy=True,
            backend=backend,
        )
        logprob = sk.linear_logprobs(x, w, target, linear_bias=b, softcap=2.0, backend=backend)
        return loss, lse, entropy, logprob

    leaves = [t.requires_grad_() for t in (x, w, b)]
    assert torch.autograd.gradcheck(outputs, leaves, fast_mode=True)


def test_a_confident_prediction_keeps_relative_precision(backend):
    """Logits [0, -20], target 0: the loss is log1p(e^-20) = 2.0611536e-09, not 0."""
    x = torch.ones(1, 1)
    w = torch.tensor([[0.0], [-20.0]])
    target = torch.tensor([0])
    loss = sk.linear_cross_entropy(x, w, target, backend=backend)
    assert loss.item() == pytest.approx(2.0611536e-09, rel=1e-6)
    logprob = sk.linear_logprobs(x, w, target, backend=backend)
    assert logprob.item() == pytest.approx(-2.0611536e-09, rel=1e-6)


def test_shapes_bias_and_module(backend, small_tiles):
    """(*, H) inputs with (*) targets, no bias, and nn.LinearCrossEntropyLoss."""
    x, w, _, target, _ = _problem(rows=12, bias=False)
    x3, t3 = x.reshape(3, 4, -1), target.reshape(3, 4)
    ours = sk.linear_cross_entropy(x3, w, t3, reduction="none", backend=backend)
    assert ours.shape == (3, 4)
    torch.testing.assert_close(ours.reshape(-1), _naive_loss(x, w, None, target, "none"))
    one = sk.linear_cross_entropy(x[0], w, target[0], backend=backend)
    torch.testing.assert_close(one, _naive_loss(x[:1], w, None, target[:1], "mean"))
    module = sk.nn.LinearCrossEntropyLoss(label_smoothing=0.1, backend=backend)
    torch.testing.assert_close(
        module(x, w, target), _naive_loss(x, w, None, target, "mean", label_smoothing=0.1)
    )


def test_all_ignored_and_empty_as_torch(backend):
    x, w, b, target, _ = _problem(rows=4)
    target[:] = -100
    ours = sk.linear_cross_entropy(x, w, target, linear_bias=b, backend=backend)
    assert ours.isnan() and _naive_loss(x, w, b, target, "mean").isnan()
    x.requires_grad_()
    w.requires_grad_()
    for reduction in ("sum", "mean"):  # mean: 0 / 0 is NaN, its gradient 0 as torch's
        loss = sk.linear_cross_entropy(x, w, target, reduction=reduction, backend=backend)
        dx, dw = torch.autograd.grad(loss, (x, w))
        assert (dx == 0).all() and (dw == 0).all()
    empty = sk.linear_cross_entropy(x[:0], w, target[:0], reduction="none", backend=backend)
    assert empty.shape == (0,)


def test_non_finite_rows_are_nan_as_the_formula(backend):
    x, w, b, target, _ = _problem(rows=4, dtype=torch.float32)
    x[1, 0] = float("nan")
    x[2, 0] = float("inf")
    ours = sk.linear_cross_entropy(x, w, target, linear_bias=b, reduction="none", backend=backend)
    ref = _naive_loss(x, w, b, target, "none").float()
    torch.testing.assert_close(ours, ref, equal_nan=True)


def test_deterministic_bitwise(backend, small_tiles):
    x, w, b, target, class_weight = _problem(rows=20, hidden=9, vocab=30, dtype=torch.float32)
    results = []
    for _ in range(2):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        loss = sk.linear_cross_entropy(
            *leaves[:2],
            target,
            linear_bias=leaves[2],
            weight=class_weight.float(),
            label_smoothing=0.1,
            backend=backend,
        )
        results.append([loss, *torch.autograd.grad(loss, leaves)])
    for a, c in zip(*results, strict=False):
        assert torch.equal(a, c)


class _LargestAllocation(TorchDispatchMode):
    """The most elements of any tensor an op creates while the mode is on."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_temporary_of_the_logits_size(backend, monkeypatch):
    """Forward (both ways: the gradient computed in the backward, or as the forward goes)
    and backward (the op routers, their aten ops all seen) never create a tensor of
    rows x V elements: with a tile budget of 4096 elements and rows x V = 600k, nothing
    larger than the inputs, the weight gradient or one tile is made."""
    if backend == "triton" and backends.TRITON_INTERPRETER:
        pytest.skip("the tiling is the same on every backend; 20 s under the interpreter")
    monkeypatch.setattr(_linear_tiles, "TILE_ELEMENTS", 4096)
    monkeypatch.setattr(_linear_tiles, "MIN_CHUNK_ROWS", 4)
    rows, hidden, vocab = 600, 8, 1000
    x, w, b, target, _ = _problem(rows, hidden, vocab, dtype=torch.float32)
    options = (-100, 0.1, 0.0, None, 1.0)
    with _LargestAllocation() as forward:
        loss, lse, entropy, logprob, *_ = ROUTERS["linear_cross_entropy"](
            x, w, b, target, None, *options, True, False, backend
        )
    with _LargestAllocation() as forward_with_gradient:
        ROUTERS["linear_cross_entropy"](x, w, b, target, None, *options, False, True, backend)
    with _LargestAllocation() as backward:
        grads = (torch.ones_like(loss), torch.zeros_like(lse), torch.ones_like(entropy))
        ROUTERS["linear_cross_entropy_backward"](
            *grads, torch.zeros_like(logprob), x, w, b, target, None, lse, entropy,
            *options, True, backend,
        )  # fmt: skip
    bound = max(4096, rows * hidden, vocab * hidden)
    assert forward.largest <= bound < rows * vocab
    assert forward_with_gradient.largest <= bound
    assert backward.largest <= bound


def test_compile_fullgraph_and_opcheck(small_tiles):
    x, w, b, target, _ = _problem(dtype=torch.float32)

    def loss_fn(x, w, b):
        return sk.linear_cross_entropy(
            x, w, target, linear_bias=b, label_smoothing=0.1, backend="torch"
        )

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    leaves = [t.requires_grad_() for t in (x, w, b)]
    expected = loss_fn(*leaves)
    got = compiled(*leaves)
    torch.testing.assert_close(got, expected)
    for a, c in zip(
        torch.autograd.grad(got, leaves), torch.autograd.grad(expected, leaves), strict=False
    ):
        torch.testing.assert_close(a, c)
    for bias, softcap, entropy in ((b, 2.0, True), (None, None, False)):
        args = (x, w, bias, target, None, -100, 0.1, 0.0, softcap, 1.0, entropy, False, "torch")
        torch.library.opcheck(ops.linear_cross_entropy.default, args)
    # with_gradient=True refuses a derivative of any output but the loss, which the
    # autograd part of opcheck takes of every output
    args = (x, w, b, target, None, -100, 0.1, 0.0, None, 1.0, False, True, "torch")
    torch.library.opcheck(
        ops.linear_cross_entropy.default,
        args,
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


def test_torch_func_grad_matches_autograd(backend, small_tiles):
    x, w, b, target, _ = _problem()

    def loss_fn(w):
        return sk.linear_cross_entropy(x, w, target, linear_bias=b, backend=backend)

    expected = torch.autograd.grad(loss_fn(w.requires_grad_()), w)[0]
    torch.testing.assert_close(torch.func.grad(loss_fn)(w.detach()), expected)


def test_unsupported_derivatives_raise(backend):
    x, w, b, target, class_weight = _problem(rows=4)
    x.requires_grad_()
    loss = sk.linear_cross_entropy(x, w, target, backend=backend)
    (dx,) = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        dx.sum().backward()
    with pytest.raises(NotImplementedError, match="forward-mode"):
        torch.func.jvp(
            lambda x: sk.linear_cross_entropy(x, w, target, backend=backend),
            (x.detach(),),
            (torch.ones_like(x),),
        )
    # The gradient computed in the forward is scaled in place by the backward: a second
    # backward through the same graph raises instead of scaling it twice.
    loss = sk.linear_cross_entropy(x, w.requires_grad_(), target, backend=backend)
    first = torch.autograd.grad(loss, w, retain_graph=True)[0].clone()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, w)
    reduction_none = sk.linear_cross_entropy(x, w, target, reduction="none", backend=backend)
    mean = reduction_none.sum() / (target != -100).sum()
    torch.testing.assert_close(torch.autograd.grad(mean, w)[0], first)
    w.requires_grad_(False)
    with pytest.raises(RuntimeError, match="not differentiable with respect to the class"):
        sk.linear_cross_entropy(
            x, w, target, weight=class_weight.requires_grad_(), backend=backend
        ).backward()


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (
            {"target": torch.zeros(4, 2, dtype=torch.long)},
            RuntimeError,
            r"expected target of shape \[4\]",
        ),
        ({"target": torch.zeros(4)}, RuntimeError, "Long or Byte, but got Float"),
        (
            {"target": torch.zeros(4, 11, dtype=torch.long)},
            RuntimeError,
            "Expected floating point type for target with class probabilities, got Long",
        ),
        ({"target": torch.tensor([0, 11, 1, 2])}, IndexError, "Target 11 is out of bounds"),
        ({"w": torch.zeros(11, 3, dtype=torch.float64)}, RuntimeError, "cannot be multiplied"),
        (
            {"b": torch.zeros(10, dtype=torch.float64)},
            RuntimeError,
            r"linear_bias must have shape \(11,\)",
        ),
        ({"x": torch.zeros(4, 7, dtype=torch.int32)}, RuntimeError, "expected a floating input"),
        ({"weight": torch.ones(10)}, RuntimeError, "weight tensor should be defined"),
        ({"softcap": 0.0}, ValueError, "softcap must be a positive finite number"),
        ({"temperature": -1.0}, ValueError, "temperature must be a positive finite number"),
        ({"reduction": "avg"}, ValueError, "avg is not a valid value for reduction"),
        ({"label_smoothing": 1.5}, RuntimeError, "label_smoothing must be between"),
    ],
)
def test_bad_arguments_raise(change, error, match):
    x, w, b, target, _ = _problem(rows=4, vocab=11)
    args = {"x": x, "w": w, "b": b, "target": target, **change}
    kw = {k: v for k, v in change.items() if k not in ("x", "w", "b", "target")}
    with pytest.raises(error, match=match):
        sk.linear_cross_entropy(args["x"], args["w"], args["target"], linear_bias=args["b"], **kw)


# ----------------------------------------------------------------------------------------
# Class-probability targets (*, V): the slower path of row chunks under activation
# checkpointing, each chunk's logits through sk.cross_entropy.


def _probabilities(rows=13, vocab=37, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(3 * torch.randn(rows, vocab, generator=g, dtype=torch.float64), -1).to(
        dtype
    )


def _naive_probability_loss(
    x, w, b, q, reduction, weight=None, label_smoothing=0.0, z_loss=0.0, temperature=1.0,
    softcap=None,
):  # fmt: skip
    """F.cross_entropy of the float64 logits against probabilities q, plus the z-loss of
    sk.cross_entropy for them (z * lse^2 on every row; "mean" over the rows)."""
    z = _naive_logits(
        x.double(), w.double(), None if b is None else b.double(), temperature, softcap
    )
    loss = F.cross_entropy(
        z, q.double(), weight=weight, label_smoothing=label_smoothing, reduction=reduction
    )
    if z_loss:
        penalty = z_loss * torch.logsumexp(z, -1) ** 2
        loss = loss + {"none": penalty, "sum": penalty.sum(), "mean": penalty.mean()}[reduction]
    return loss


def _interpreted(backend):
    return backend == "triton" and backends.TRITON_INTERPRETER


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", OPTIONS)
def test_probability_targets_match_the_float64_formula(backend, small_tiles, option, reduction):
    """Loss and gradients of input, linear_weight, linear_bias (and of the probabilities)
    against autograd of the float64 formula; 7 rows in chunks of 2."""
    if _interpreted(backend) and (option, reduction) not in (
        ("everything", "mean"),
        ("softcap", "none"),
    ):
        pytest.skip("the path is the backend's cross_entropy per chunk; 2 cases interpreted")
    x, w, b, _, class_weight = _problem(rows=7)
    q = _probabilities(rows=7)
    kw = _kwargs(option, class_weight)
    leaves = [t.requires_grad_() for t in (x, w, b, q)]
    ours = sk.linear_cross_entropy(
        x, w, q, linear_bias=b, reduction=reduction, backend=backend, **kw
    )
    ref = _naive_probability_loss(x, w, b, q, reduction, **kw)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    for a, r in zip(
        torch.autograd.grad(ours, leaves, g), torch.autograd.grad(ref, leaves, g), strict=True
    ):
        torch.testing.assert_close(a, r, rtol=1e-11, atol=1e-12)


def test_probability_targets_lse_entropy_and_gradcheck(backend, small_tiles):
    """return_lse and return_entropy per row (batch shape, float64 here) as the formula;
    gradcheck of every output at once, through the chunks' recomputation."""
    x, w, b, _, class_weight = _problem(rows=5, hidden=3, vocab=11)
    q = _probabilities(5, 11)
    kw = {"softcap": 2.0, "temperature": 0.8}
    loss, lse, entropy = sk.linear_cross_entropy(
        x, w, q, linear_bias=b, return_lse=True, return_entropy=True, backend=backend, **kw
    )
    z = _naive_logits(x, w, b, **kw)
    logp = torch.log_softmax(z, -1)
    torch.testing.assert_close(loss, _naive_probability_loss(x, w, b, q, "mean", **kw))
    torch.testing.assert_close(lse, torch.logsumexp(z, -1), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(entropy, -(logp.exp() * logp).sum(-1), rtol=1e-12, atol=1e-13)

    def outputs(x, w, b, q):
        return sk.linear_cross_entropy(
            x, w, q, linear_bias=b, weight=class_weight, label_smoothing=0.1, z_loss=1e-2,
            reduction="none", return_lse=True, return_entropy=True, backend=backend, **kw,
        )  # fmt: skip

    leaves = [t.requires_grad_() for t in (x, w, b, q)]
    assert torch.autograd.gradcheck(outputs, leaves, fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_probability_targets_in_low_precision(backend, dtype):
    """Half inputs and probabilities: logits in float32, the loss (the half dtype) and the
    gradients within the bounds of float32 arithmetic in any summation order, then one
    rounding to the dtype (tests/bounds.py), of the float64 formula on the same inputs;
    under CPU autocast the loss is float32 and the matmul stays in float32 (close to the
    float32 result, not to a bf16 matmul's)."""
    x, w, b, _, _ = _problem(rows=24, hidden=16, vocab=100, dtype=dtype)
    q = _probabilities(24, 100, dtype=dtype)
    leaves = [t.requires_grad_() for t in (x, w, b)]
    ours = sk.linear_cross_entropy(
        x, w, q, linear_bias=b, label_smoothing=0.1, reduction="none", backend=backend
    )
    assert ours.dtype == dtype
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]  # float64 gradients
    ref = _naive_probability_loss(*ref_leaves, q, "none", label_smoothing=0.1)
    g = torch.rand_like(ref).to(dtype)  # the gradient ours receives, also the reference's
    bounds = linear_cross_entropy_bounds(x, w, b, q, g, label_smoothing=0.1)
    assert_within(ours, ref, bounds.loss, "loss")
    assert_gradients_within(
        torch.autograd.grad(ours, leaves, g),
        torch.autograd.grad(ref, ref_leaves, g.double()),
        bounds.grads,
        dtype,
    )
    if dtype == torch.bfloat16:
        fp32 = sk.linear_cross_entropy(x.float(), w.float(), q.float(), linear_bias=b.float())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast_loss = sk.linear_cross_entropy(x, w, q, linear_bias=b, backend=backend)
        assert autocast_loss.dtype == torch.float32
        torch.testing.assert_close(autocast_loss, fp32, rtol=1e-6, atol=1e-6)


def test_probability_targets_shapes_module_and_empty(backend, small_tiles):
    """(*, H) inputs with (*, V) probabilities, a 1-D input, no bias, the module, an empty
    batch (mean NaN, as torch), and float32 probabilities promoting a bfloat16 loss."""
    x, w, _, _, class_weight = _problem(rows=12, bias=False)
    q = _probabilities(12)
    ours = sk.linear_cross_entropy(
        x.reshape(3, 4, -1), w, q.reshape(3, 4, -1), reduction="none", backend=backend
    )
    assert ours.shape == (3, 4)
    torch.testing.assert_close(ours.reshape(-1), _naive_probability_loss(x, w, None, q, "none"))
    one = sk.linear_cross_entropy(x[0], w, q[0], backend=backend)
    torch.testing.assert_close(one, _naive_probability_loss(x[:1], w, None, q[:1], "mean"))
    module = sk.nn.LinearCrossEntropyLoss(class_weight, label_smoothing=0.1, backend=backend)
    torch.testing.assert_close(
        module(x, w, q),
        _naive_probability_loss(x, w, None, q, "mean", weight=class_weight, label_smoothing=0.1),
    )
    assert sk.linear_cross_entropy(x[:0], w, q[:0], backend=backend).isnan()
    assert sk.linear_cross_entropy(x[:0], w, q[:0], reduction="sum", backend=backend) == 0
    empty = sk.linear_cross_entropy(x[:0], w, q[:0], reduction="none", backend=backend)
    assert empty.shape == (0,)
    half = sk.linear_cross_entropy(x.bfloat16(), w.bfloat16(), q.float(), backend=backend)
    assert half.dtype == torch.float32


@pytest.mark.parametrize(
    ("target", "kw", "match"),
    [
        (torch.zeros(4, 11, dtype=torch.long), {}, "Expected floating point type for target"),
        (torch.full((4, 11), 1 / 11), {"ignore_index": 0}, "ignore_index is not supported"),
        (torch.zeros(4, 7), {}, r"expected target of shape \[4\] \(class indices\) or \[4, 11\]"),
    ],
)
def test_probability_target_errors_as_torch(target, kw, match):
    x, w, b, _, _ = _problem(rows=4, vocab=11, dtype=torch.float32)
    with pytest.raises(RuntimeError, match=match):
        sk.linear_cross_entropy(x, w, target, linear_bias=b, **kw)
    if target.is_floating_point() and target.shape == (4, 11):
        with pytest.raises(NotImplementedError, match="class-probability targets"):
            sk.linear_logprobs(x, w, target, linear_bias=b)


class _LargestNewStorage(TorchDispatchMode):
    """The most elements of any storage an op creates while the mode is on (views of the
    given tensors, such as the chunks of the target, do not count)."""

    def __init__(self, *given):
        super().__init__()
        self.given = {t.untyped_storage().data_ptr() for t in given}
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.given:
                size = t.untyped_storage().nbytes() // max(t.element_size(), 1)
                self.largest = max(self.largest, size)
        return out


def test_probability_targets_hold_one_chunk_of_logits(backend, monkeypatch):
    """Forward and backward (autograd, the checkpointed chunks recomputed) never create a
    storage of rows x V elements: with a budget of 32768 elements (chunks of 32 rows of
    1000 logits) and rows x V = 200k, nothing larger than a chunk's logits, the inputs or
    the weight's gradient is made."""
    if _interpreted(backend):
        pytest.skip("the chunking is the same on every backend; slow under the interpreter")
    monkeypatch.setattr(_linear_tiles, "TILE_ELEMENTS", 32768)
    monkeypatch.setattr(_linear_tiles, "MIN_CHUNK_ROWS", 4)
    rows, hidden, vocab = 200, 8, 1000
    x, w, b, _, class_weight = _problem(rows, hidden, vocab, dtype=torch.float32)
    q = _probabilities(rows, vocab, dtype=torch.float32)
    leaves = [t.requires_grad_() for t in (x, w, b)]
    with _LargestNewStorage(x, w, b, q, class_weight) as watched:
        loss, entropy = sk.linear_cross_entropy(
            x, w, q, linear_bias=b, weight=class_weight.float(), label_smoothing=0.1,
            return_entropy=True, backend=backend,
        )  # fmt: skip
        grads = torch.autograd.grad(loss + entropy.sum(), leaves)
    bound = max(32768, rows * hidden, vocab * hidden)
    assert 32000 <= watched.largest <= bound < rows * vocab
    ref = _naive_probability_loss(x, w, b, q, "mean", weight=class_weight, label_smoothing=0.1)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    assert all(g.shape == t.shape for g, t in zip(grads, leaves, strict=True))


def test_probability_targets_compile_fullgraph(small_tiles):
    """torch.compile(fullgraph=True) traces the chunks (here 2) and their checkpoints: the
    same loss and gradients as eager."""
    x, w, b, _, class_weight = _problem(rows=4, dtype=torch.float32)
    q = _probabilities(rows=4, dtype=torch.float32)

    def loss_fn(x, w, b):
        return sk.linear_cross_entropy(
            x, w, q, linear_bias=b, weight=class_weight.float(), label_smoothing=0.1,
            z_loss=1e-2, softcap=3.0, backend="torch",
        )  # fmt: skip

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    leaves = [t.requires_grad_() for t in (x, w, b)]
    expected = loss_fn(*leaves)
    got = compiled(*leaves)
    torch.testing.assert_close(got, expected)
    for a, c in zip(
        torch.autograd.grad(got, leaves), torch.autograd.grad(expected, leaves), strict=True
    ):
        torch.testing.assert_close(a, c)


def test_probability_targets_under_torch_func(small_tiles):
    """torch.func.grad (which refuses checkpointing's hooks: the chunks are then not
    checkpointed) and vmap of it give autograd's gradient."""
    x, w, b, _, _ = _problem(rows=5)
    q = _probabilities(rows=5)

    def loss_fn(w):
        return sk.linear_cross_entropy(x, w, q, linear_bias=b, z_loss=1e-2, backend="torch")

    expected = torch.autograd.grad(loss_fn(w.requires_grad_()), w)[0]
    w = w.detach()
    torch.testing.assert_close(torch.func.grad(loss_fn)(w), expected)
    batched = torch.func.vmap(torch.func.grad(loss_fn))(torch.stack([w, w]))
    torch.testing.assert_close(batched, torch.stack([expected, expected]))
