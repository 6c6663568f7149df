"""sk.cross_entropy against torch.nn.functional.cross_entropy: every option and shape, values
and gradients, on every backend present; the tiny-loss accuracy; errors; memory; compile."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import stablekernels as sk
from stablekernels import backends

from .conftest import CPU_BACKENDS

SHAPES = {
    "C": ((37,), ()),
    "NC": ((9, 37), (9,)),
    "NCd": ((4, 37, 3), (4, 3)),
    "NCdd": ((2, 11, 3, 2), (2, 3, 2)),
    "long vocab": ((3, 40000), (3,)),
}
TOL = {
    torch.float32: (2e-6, 2e-6),
    torch.float64: (1e-12, 1e-12),
    torch.float16: (3e-3, 3e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


def _inputs(shape_name, dtype, soft=False, ignore_index=-100, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape, batch = SHAPES[shape_name]
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3).to(dtype)
    classes = shape[0] if len(shape) == 1 else shape[1]
    if soft:
        target = torch.softmax(
            torch.randn(shape, generator=gen, dtype=torch.float64), 0 if len(shape) == 1 else 1
        ).to(dtype)
    else:
        target = torch.randint(0, classes, batch, generator=gen)
        if target.dim() and target.numel() > 2:
            target.view(-1)[1] = ignore_index  # one ignored entry
    return x, target, classes


def _reference(x, target, weight, **options):
    """F.cross_entropy in float64 (halves: their values, exactly, in float64)."""
    w = None if weight is None else weight.double()
    t = target.double() if target.is_floating_point() else target
    return F.cross_entropy(x.double(), t, w, **options)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_matches_torch_with_gradients(
    backend, dtype, reduction, shape_name, weighted, label_smoothing
):
    x, target, classes = _inputs(shape_name, dtype)
    weight = torch.rand(classes, dtype=torch.float64).to(dtype) + 0.5 if weighted else None
    options = dict(reduction=reduction, label_smoothing=label_smoothing)
    a = x.clone().requires_grad_()
    ours = sk.cross_entropy(a, target, weight, backend=backend, **options)
    b = x.double().requires_grad_()
    ref = _reference(b, target, weight, **options)
    assert ours.dtype == dtype and ours.shape == ref.shape
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(
        ours.double(), ref, rtol=rtol, atol=atol * max(1.0, ref.detach().abs().max().item())
    )
    dy = torch.randn(ref.shape, dtype=torch.float64)
    ours.backward(dy.to(dtype))
    ref.backward(dy)
    scale = b.grad.abs().max().item()
    torch.testing.assert_close(a.grad.double(), b.grad, rtol=rtol * 4, atol=atol * 4 * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_class_probability_targets(backend, dtype, weighted, label_smoothing, reduction):
    x, target, classes = _inputs("NCd", dtype, soft=True)
    weight = torch.rand(classes).to(dtype) + 0.5 if weighted else None
    options = dict(reduction=reduction, label_smoothing=label_smoothing)
    a = x.clone().requires_grad_()
    ours = sk.cross_entropy(a, target, weight, backend=backend, **options)
    b = x.double().requires_grad_()
    ref = _reference(b, target, weight, **options)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(
        ours.double(), ref, rtol=rtol, atol=atol * max(1.0, ref.detach().abs().max().item())
    )
    ours.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(a.grad.double(), b.grad, rtol=rtol * 4, atol=atol * 4)


def test_confident_correct_prediction_keeps_relative_precision(backend):
    x = torch.tensor([[0.0, -20.0], [0.0, -30.0]])
    loss = sk.cross_entropy(x, torch.tensor([0, 0]), reduction="none", backend=backend)
    exact = [math.log1p(math.exp(-20.0)), math.log1p(math.exp(-30.0))]
    assert loss[0].item() == pytest.approx(2.0611536e-09, rel=1e-5)
    assert loss.tolist() == pytest.approx(exact, rel=1e-6)
    assert F.cross_entropy(x, torch.tensor([0, 0]), reduction="none")[0].item() == 0.0


@pytest.mark.parametrize("reduction,expected", [("mean", math.nan), ("sum", 0.0)])
def test_all_rows_ignored(backend, reduction, expected):
    x = torch.randn(4, 7, requires_grad=True)
    target = torch.full((4,), -100)
    ours = sk.cross_entropy(x, target, reduction=reduction, backend=backend)
    theirs = F.cross_entropy(x, target, reduction=reduction)
    torch.testing.assert_close(ours, theirs, equal_nan=True)
    assert math.isnan(ours.item()) if math.isnan(expected) else ours.item() == expected
    ours.backward()
    assert not x.grad.isnan().any() or reduction == "mean"


@pytest.mark.parametrize("ignore_index", [-100, 2, -1])
def test_ignore_index(backend, ignore_index):
    x = torch.randn(8, 5)
    target = torch.tensor([0, 2, 4, 2, 1, 3, 2, 0])
    if ignore_index == -1:
        target[3] = -1
    for reduction in ("mean", "sum", "none"):
        ours = sk.cross_entropy(
            x, target, ignore_index=ignore_index, reduction=reduction, backend=backend
        )
        theirs = F.cross_entropy(x, target, ignore_index=ignore_index, reduction=reduction)
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_z_loss_and_returned_lse(backend, reduction):
    x = torch.randn(6, 50) * 4
    target = torch.tensor([1, 2, -100, 3, 49, 0])
    z = 1e-2
    loss, lse = sk.cross_entropy(
        x, target, reduction=reduction, z_loss=z, return_lse=True, backend=backend
    )
    assert lse.dtype == torch.float32 and lse.shape == (6,)
    torch.testing.assert_close(lse, torch.logsumexp(x, 1))
    counted = target != -100
    rows = F.cross_entropy(x, target, reduction="none") + z * torch.where(
        counted, torch.logsumexp(x, 1) ** 2, 0.0
    )
    expected = {"none": rows, "sum": rows.sum(), "mean": rows.sum() / counted.sum()}[reduction]
    torch.testing.assert_close(loss, expected)


def _z_loss_reference(x, target, weight, z, reduction, **options):
    """The float64 loss with a z-loss, from its definition: torch's cross-entropy plus the
    unweighted per-row penalty z * lse**2 over the counted rows (for "mean": averaged over
    their number, whatever the class weights)."""
    ignore_index = options.get("ignore_index", -100)
    ce = _reference(x, target, weight, reduction=reduction, **options)
    counted = target != ignore_index
    lse = torch.logsumexp(x.double(), 1)
    penalty = torch.where(counted, lse, 0.0) ** 2 * z
    if reduction == "none":
        return ce + penalty
    if reduction == "sum":
        return ce + penalty.sum()
    return ce + penalty.sum() / counted.sum()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_z_loss_with_class_weights_is_unweighted(backend, reduction, label_smoothing):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 10, generator=gen, dtype=torch.float64) * 3
    target = torch.tensor([1, 2, -100, 3, 9, 0])
    weight = torch.rand(10, generator=gen, dtype=torch.float64) + 0.1
    z = 1e-2
    options = dict(reduction=reduction, label_smoothing=label_smoothing, ignore_index=-100)
    for dtype in (torch.float64, torch.float32):
        ours = sk.cross_entropy(
            x.to(dtype), target, weight.to(dtype), z_loss=z, backend=backend, **options
        )
        expected = _z_loss_reference(x.to(dtype), target, weight.to(dtype), z, **options)
        rtol = 1e-12 if dtype == torch.float64 else 2e-6
        torch.testing.assert_close(ours.double(), expected, rtol=rtol, atol=rtol)


def test_z_loss_mean_does_not_depend_on_the_scale_of_the_weights(backend):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, 10, generator=gen, dtype=torch.float64) * 3
    target = torch.tensor([1, 2, -100, 3, 9, 0])
    weight = torch.rand(10, generator=gen, dtype=torch.float64) + 0.1
    losses = [
        sk.cross_entropy(x, target, weight * scale, z_loss=1e-2, backend=backend)
        for scale in (1.0, 2.0, 0.125)
    ]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-13, atol=0)
    torch.testing.assert_close(losses[2], losses[0], rtol=1e-13, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_z_loss_with_weights_gradients(backend, reduction):
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(5, 7, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    target = torch.tensor([1, -100, 3, 6, 0])
    weight = torch.rand(7, generator=gen, dtype=torch.float64) + 0.1
    options = dict(reduction=reduction, label_smoothing=0.1)

    def ours(t):
        return sk.cross_entropy(t, target, weight, z_loss=0.05, backend=backend, **options)

    # against the float64 formula's own gradients, then gradcheck and gradgradcheck
    (grad,) = torch.autograd.grad(ours(x).sum(), x)
    y = x.detach().requires_grad_()
    (want,) = torch.autograd.grad(_z_loss_reference(y, target, weight, 0.05, **options).sum(), y)
    torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(ours, (x,))
    assert torch.autograd.gradgradcheck(ours, (x,))


def test_gradient_through_the_returned_lse(backend):
    x = torch.randn(5, 30, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 30, (5,))
    fn = lambda t: sum(sk.cross_entropy(t, target, return_lse=True, backend=backend))  # noqa: E731
    (grad,) = torch.autograd.grad(fn(x).sum(), x)
    y = x.detach().requires_grad_()
    (ref,) = torch.autograd.grad((F.cross_entropy(y, target) + torch.logsumexp(y, 1)).sum(), y)
    torch.testing.assert_close(grad, ref)


def test_special_values_as_torch(backend):
    inf, nan = float("inf"), float("nan")
    x = torch.tensor(
        [[inf, 0.0, 1.0], [nan, 0.0, 1.0], [-inf, -inf, -inf], [-inf, 0.0, 1.0], [2.0, 2.0, 1.0]]
    )
    target = torch.tensor([1, 1, 0, 2, 0])
    for smoothing in (0.0, 0.1):
        ours = sk.cross_entropy(
            x, target, reduction="none", label_smoothing=smoothing, backend=backend
        )
        theirs = F.cross_entropy(x, target, reduction="none", label_smoothing=smoothing)
        torch.testing.assert_close(ours, theirs, equal_nan=True)


# Runs of -inf logits covering whole tiles and chunks of the kernels (Triton tiles of 2048,
# CPU chunks of 16384) at the start, the middle and the end of a row: with label smoothing the
# loss is inf, as torch's, never the NaN of a -inf - -inf in the running sums.
@pytest.mark.parametrize(
    "classes, start, stop",
    [
        (10, 3, 4),
        (4096, 0, 2048),
        (4096, 2048, 4096),
        (40000, 0, 16384),
        (40000, 16384, 32768),
        (40000, 32768, 40000),
    ],
)
@pytest.mark.parametrize("weighted", [False, True])
def test_smoothing_with_tiles_of_minus_inf_is_inf_as_torch(backend, classes, start, stop, weighted):
    x = torch.randn(2, classes)
    x[0, start:stop] = float("-inf")
    target = torch.tensor([stop % classes, 1])
    weight = torch.rand(classes) + 0.5 if weighted else None
    ours = sk.cross_entropy(
        x, target, weight, reduction="none", label_smoothing=0.1, backend=backend
    )
    theirs = F.cross_entropy(x, target, weight, reduction="none", label_smoothing=0.1)
    assert ours[0].item() == theirs[0].item() == float("inf")
    torch.testing.assert_close(ours[1], theirs[1])


def test_nn_module(backend):
    x = torch.randn(7, 9)
    target = torch.randint(0, 9, (7,))
    weight = torch.rand(9)
    module = sk.nn.CrossEntropyLoss(weight, label_smoothing=0.05, backend=backend)
    torch.testing.assert_close(
        module(x, target), torch.nn.CrossEntropyLoss(weight, label_smoothing=0.05)(x, target)
    )
    assert "label_smoothing=0.05" in repr(module)


def test_bad_arguments_raise_like_torch():
    x = torch.randn(5, 4)
    target = torch.tensor([0, 1, 2, 3, 0])
    cases = [
        (lambda m: m(x, torch.tensor([0, 1, 2, 3, 4])), IndexError),
        (lambda m: m(x, torch.tensor([-1, 0, 0, 0, 0])), IndexError),
        (lambda m: m(x, target[:3]), ValueError),
        (lambda m: m(x, target.int()), RuntimeError),
        (lambda m: m(x, target, torch.rand(3)), RuntimeError),
        (lambda m: m(x, target, label_smoothing=1.5), RuntimeError),
        (lambda m: m(x, target, reduction="avg"), ValueError),
    ]
    for call, error in cases:
        with pytest.raises(error):
            call(F.cross_entropy)
        with pytest.raises(error):
            call(sk.cross_entropy)


# Every check torch makes of a cross-entropy target: (input, target, options). torch decides
# by shape: a target of the input's shape holds class probabilities, any other class indices.
_X1, _X2, _X3 = torch.randn(5), torch.randn(3, 5), torch.randn(2, 5, 4)
_P2 = torch.softmax(torch.randn(3, 5), 1)
TARGET_CHECKS = {
    "float target of another shape": (_X2, torch.tensor([0.0, 1.0, 2.0]), {}),
    "float64 target of another shape": (_X2, torch.zeros(3, dtype=torch.float64), {}),
    "float target of another shape, (N, C, d)": (_X3, torch.zeros(2, 4), {}),
    "float target, 2-D of another shape": (_X2, torch.zeros(3, 4), {}),
    "float 0-dim target of a (C) input": (_X1, torch.tensor(1.0), {}),
    "int32 class target": (_X2, torch.tensor([0, 1, 2], dtype=torch.int32), {}),
    "int16 class target": (_X2, torch.tensor([0, 1, 2], dtype=torch.int16), {}),
    "bool class target": (_X2, torch.tensor([True, False, True]), {}),
    "int64 target of the input's shape": (_X2, torch.zeros(3, 5, dtype=torch.long), {}),
    "int32 target of the input's shape": (_X2, torch.zeros(3, 5, dtype=torch.int32), {}),
    "probabilities with ignore_index 1": (_X2, _P2, {"ignore_index": 1}),
    "probabilities with ignore_index 0": (_X2, _P2, {"ignore_index": 0}),
    "batch size mismatch": (_X2, torch.tensor([0, 1, 2, 3]), {}),
    "batch size mismatch, (N, C, d)": (_X3, torch.zeros(3, 4, dtype=torch.long), {}),
    "0-dim target of an (N, C) input": (_X2, torch.tensor(1), {}),
    "0-dim target of an (N, C, d) input": (_X3, torch.tensor(1), {}),
    "2-D target of an (N, C) input": (_X2, torch.zeros(3, 1, dtype=torch.long), {}),
    "2-D target of a (C) input": (_X1, torch.zeros(1, 1, dtype=torch.long), {}),
    "1-D target of size 2 for a (C) input": (_X1, torch.tensor([1, 2]), {}),
    "wrong target size, (N, C, d)": (_X3, torch.zeros(2, 3, dtype=torch.long), {}),
    "1-D target of an (N, C, d) input": (_X3, torch.zeros(2, dtype=torch.long), {}),
    "class out of range": (_X2, torch.tensor([0, 7, 1]), {}),
    "negative class": (_X2, torch.tensor([0, -5, 1]), {}),
    "uint8 class out of range": (_X2, torch.tensor([0, 1, 255], dtype=torch.uint8), {}),
}


@pytest.mark.parametrize("case", list(TARGET_CHECKS))
def test_bad_targets_raise_as_torch(backend, case):
    x, target, options = TARGET_CHECKS[case]
    with pytest.raises(Exception) as theirs:
        F.cross_entropy(x, target, **options)
    with pytest.raises(Exception) as ours:
        sk.cross_entropy(x, target, backend=backend, **options)
    assert ours.type is theirs.type
    # torch's message, word for word (stablekernels may add a hint after it)
    assert str(ours.value).startswith(str(theirs.value).splitlines()[0])


@pytest.mark.parametrize(
    "x,target,options",
    [
        (_X1, torch.tensor([2]), {}),  # a (1,) target of a (C) input: as a 0-dim one
        (_X2, _P2, {"ignore_index": -1}),  # a negative ignore_index is allowed
        (_X2, _P2.double(), {}),  # probabilities of another floating dtype
        (_X2, torch.tensor([0, 1, 2], dtype=torch.uint8), {}),
    ],
)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_targets_torch_accepts_are_accepted(backend, x, target, options, reduction):
    ours = sk.cross_entropy(x, target, reduction=reduction, backend=backend, **options)
    theirs = F.cross_entropy(x, target, reduction=reduction, **options)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs)


# gradgradcheck of cross_entropy in float64 for every reduction, option and shape.
GRADGRAD_OPTIONS = {
    "plain": {},
    "weight": {"weight": "w"},
    "ignore_index": {"ignore_index": 1},
    "label_smoothing": {"label_smoothing": 0.2},
    "z_loss": {"z_loss": 0.05},
}
GRADGRAD_SHAPES = {"C": ((4,), ()), "NC": ((3, 4), (3,)), "NCdd": ((2, 4, 2, 2), (2, 2, 2))}


@pytest.mark.parametrize("shape_name", list(GRADGRAD_SHAPES))
@pytest.mark.parametrize("option", list(GRADGRAD_OPTIONS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradgradcheck(backend, reduction, option, shape_name):
    # Under the Triton interpreter the full check of (N, C, d1, d2) takes 15 s a case: there
    # it runs in fast mode (the Jacobians compared along random directions).
    fast = shape_name == "NCdd" and backend == "triton" and backends.TRITON_INTERPRETER
    gen = torch.Generator().manual_seed(11)
    shape, batch = GRADGRAD_SHAPES[shape_name]
    x = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 4, batch, generator=gen)
    target.view(-1)[-1] = 2  # counted: a mean over no row is NaN, with no derivative
    if target.dim():
        target.view(-1)[0] = 1  # a row that ignore_index=1 ignores
    options = dict(GRADGRAD_OPTIONS[option], reduction=reduction)
    if options.get("weight") == "w":
        options["weight"] = torch.rand(4, generator=gen, dtype=torch.float64) + 0.1

    def fn(t):
        return sk.cross_entropy(t, target, backend=backend, **options)

    assert torch.autograd.gradcheck(fn, (x,), fast_mode=fast)
    assert torch.autograd.gradgradcheck(fn, (x,), fast_mode=fast)


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="the compiled extension is not built")
@pytest.mark.parametrize("backend_name", ["cpp", "torch"])
def test_backward_allocates_nothing_logits_sized_but_dx(backend_name):
    from benchmarks.runner import peak_memory_bytes

    x = torch.randn(512, 32000)
    target = torch.randint(0, 32000, (512,))

    def step(fn):
        leaf = x.detach().requires_grad_()
        return torch.autograd.grad(fn(leaf).sum(), leaf)[0]

    ours = peak_memory_bytes(
        lambda: step(lambda t: sk.cross_entropy(t, target, backend=backend_name)),
        torch.device("cpu"),
    )
    theirs = peak_memory_bytes(
        lambda: step(lambda t: F.cross_entropy(t, target)), torch.device("cpu")
    )
    dx = x.numel() * x.element_size()
    bounded = 0 if backend_name == "cpp" else 4 * (1 << 22) * 4  # the torch backend's chunks
    assert ours <= dx + bounded + 64 * x.shape[0] + (1 << 16)
    assert ours < theirs


def test_fullgraph_compile(backend):
    torch._dynamo.reset()

    def loss_fn(x, target):
        return sk.cross_entropy(x, target, label_smoothing=0.1, backend=backend)

    compiled = torch.compile(loss_fn, fullgraph=True)
    x = torch.randn(6, 40, requires_grad=True)
    target = torch.randint(0, 40, (6,))
    expected = loss_fn(x, target)
    (expected_grad,) = torch.autograd.grad(expected, x)
    got = compiled(x, target)
    (got_grad,) = torch.autograd.grad(got, x)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got_grad, expected_grad)


def test_opcheck_cross_entropy_ops(backend):
    ops = torch.ops.stablekernels
    x = torch.randn(5, 11, requires_grad=True)
    target = torch.tensor([0, 3, -100, 10, 2])
    weight = torch.rand(11)
    cases = []
    for reduction in ("none", "mean", "sum"):
        _, lse, counts = ops.cross_entropy(x, target, weight, -100, 0.1, 0.01, reduction, backend)
        grad = torch.randn(5) if reduction == "none" else torch.randn(())
        cases += [
            (ops.cross_entropy.default, (x, target, None, -100, 0.0, 0.0, reduction, backend)),
            (ops.cross_entropy.default, (x, target, weight, -100, 0.1, 0.01, reduction, backend)),
        ]
        for grad_lse in (torch.randn(5, dtype=torch.float64), None):
            args = (grad, grad_lse, x.detach(), target, weight, lse.detach(), counts)
            options = (-100, 0.1, 0.01, reduction, backend)
            cases.append((ops.cross_entropy_backward.default, args + options))
    for op, args in cases:
        results = torch.library.opcheck(op, args)
        assert set(results.values()) == {"SUCCESS"}, (op, results)


def _outcome(call):
    try:
        return call()
    except Exception as error:  # noqa: BLE001 (compared by type and message below)
        return error


def _same_outcome(ours, theirs):
    if isinstance(theirs, Exception) or isinstance(ours, Exception):
        assert type(ours) is type(theirs), (ours, theirs)
        assert str(ours) == str(theirs), (ours, theirs)
    else:
        torch.testing.assert_close(ours, theirs, equal_nan=True)


@pytest.mark.parametrize("shape,target", [((3, 0), [-100, -100, -100]), ((3, 0), [-100, 0, -100]),
                                          ((0,), -100), ((0,), 0)])  # fmt: skip
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_no_classes_as_torch(backend, shape, target, reduction, weighted, label_smoothing):
    """Zero classes: ignored rows give torch's loss (0; NaN for the mean of nothing and for
    the smoothing term (e / 0) * 0), a counted row torch's IndexError; no kernel runs on it."""
    x = torch.randn(shape, requires_grad=True)
    target = torch.tensor(target)
    options = dict(reduction=reduction, label_smoothing=label_smoothing)
    weight = torch.ones(0) if weighted else None
    ours = _outcome(lambda: sk.cross_entropy(x, target, weight, backend=backend, **options))
    _same_outcome(ours, _outcome(lambda: F.cross_entropy(x, target, weight, **options)))
    if isinstance(ours, torch.Tensor):
        ours.sum().backward()
        assert x.grad.shape == x.shape


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_no_classes_with_class_probabilities_as_torch(backend, reduction, label_smoothing):
    x, p = torch.randn(3, 0), torch.rand(3, 0)
    options = dict(reduction=reduction, label_smoothing=label_smoothing)
    _same_outcome(
        sk.cross_entropy(x, p, backend=backend, **options), F.cross_entropy(x, p, **options)
    )


def test_target_check_never_waits_for_the_device():
    """Off the CPU the router checks targets with a device-side assert: no value reaches the
    host (on meta tensors, which have no values, any data-dependent step raises), so no
    synchronisation, and CUDA graph capture works (tests/test_gpu.py shows both on a GPU)."""
    from stablekernels.ops.cross_entropy import _class_rows

    logits = torch.empty(4, 10, device="meta")
    target = torch.zeros(4, dtype=torch.int64, device="meta")
    safe, counted, w = _class_rows(10, logits.dtype, target, torch.ones(10, device="meta"), -100)
    assert safe.shape == counted.shape == (4,) and w.shape == (10,)
    with pytest.raises(IndexError, match="Target 10 is out of bounds"):
        _class_rows(10, torch.float32, torch.tensor([0, 10, 2, 3]), None, -100)


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="the compiled extension is not built")
def test_cpp_kernels_called_directly_refuse_a_target_outside_the_row():
    """The kernel ops check their targets themselves: no read or write outside a row."""
    x = torch.randn(3, 10)
    for bad in (10, -1):
        target = torch.tensor([0, bad, 2])
        with pytest.raises(IndexError, match=f"Target {bad} is out of bounds"):
            torch.ops.stablekernels._fused_cross_entropy(x, target, None, False)
        with pytest.raises(IndexError, match=f"Target {bad} is out of bounds"):
            terms = torch.zeros(3, 5)
            torch.ops.stablekernels._fused_cross_entropy_backward(x, target, None, terms)


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="the extension is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_the_cpp_epilogue_is_the_torch_reference_epilogue(dtype, reduction):
    """The loss algebra is written once per language: the C++ kernels' epilogue
    (cross_entropy_rows.h) against the torch one (torch_ce.loss_from_pieces /
    gradient_from_terms) around the same C++ row pieces, on every option at once and on odd
    rows (ignored, all -inf, a +inf, a NaN): the same lse, the same values to a few roundings
    of fp64 (the C++ reduction adds in row order, torch's sum pairwise) and the same
    gradients to a few roundings."""
    from stablekernels.backends import torch_ce

    ops = torch.ops.stablekernels
    torch.manual_seed(0)
    x = (torch.randn(37, 300) * 4).to(dtype)
    x[3] = float("-inf")
    x[5, 7] = float("inf")
    x[6, 1] = float("nan")
    target = torch.randint(0, 300, (37,))
    target[::4] = -1  # ignored
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    weight = torch.rand(300, dtype=acc)
    options = (-1, 0.1, 1e-3, reduction)
    loss, lse, counts = ops._fused_cross_entropy_loss(x, target, weight, *options)
    ref_loss, ref_lse, ref_counts = torch_ce.loss_from_pieces(
        ops._fused_cross_entropy.default, x, target, weight, *options
    )
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(counts, ref_counts, rtol=1e-14, atol=0)
    torch.testing.assert_close(
        loss, ref_loss, rtol=1e-6 if acc == torch.float32 else 1e-13, atol=0, equal_nan=True
    )
    keep = lse.isfinite()  # the gradient of finite rows (NaN rows give NaN either way)
    grad = torch.randn(37, dtype=acc) if reduction == "none" else torch.randn((), dtype=acc)
    grad_lse = torch.randn(37, dtype=torch.float64)
    for g_lse in (None, grad_lse):
        dx = ops._fused_cross_entropy_loss_backward(
            grad, g_lse, x, target, weight, lse, counts, *options
        )
        ref = torch_ce.gradient_from_terms(
            ops._fused_cross_entropy_backward.default,
            grad,
            g_lse,
            x,
            target,
            weight,
            lse,
            counts,
            *options,
        )
        # Each side rounds the same fp64 terms; a contraction into a fused multiply-add in
        # one of them moves a term by an ulp of fp64.
        tol = (1e-13, 1e-15) if acc == torch.float64 else (1e-6, 1e-7)
        torch.testing.assert_close(dx[keep], ref[keep], rtol=tol[0], atol=tol[1])


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="the extension is not built")
def test_the_reduced_loss_is_the_same_for_every_thread_count():
    """The C++ reduction adds the rows in row order in fp64, whatever the threads: bitwise."""
    x = torch.randn(3000, 500)
    target = torch.randint(0, 500, (3000,))
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(
                [
                    sk.cross_entropy(x, target, reduction=r, label_smoothing=0.1, backend="cpp")
                    for r in ("mean", "sum")
                ]
            )
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_strided_logits_targets_and_weights_without_autograd(backend):
    """The eager call without autograd (the public function straight to the fused kernel)
    takes strided logits, targets and class weights, as the general path does."""
    x = torch.randn(6, 10).t()  # (10, 6), rows at stride 1, classes at stride 10
    target = torch.randint(0, 6, (20,))[::2]
    weight = torch.rand(12)[::2]
    for reduction in ("mean", "sum", "none"):
        with torch.no_grad():
            ours = sk.cross_entropy(x, target, weight, reduction=reduction, backend=backend)
        theirs = F.cross_entropy(x.double(), target, weight.double(), reduction=reduction)
        torch.testing.assert_close(ours.double(), theirs, rtol=2e-6, atol=1e-7)


def _fused_kernels(backend):
    """The backend's fused loss kernels (``cross_entropy_loss`` and its backward)."""
    kernels = backends.get_backend(backend).kernels()
    if kernels.cross_entropy_loss is None:
        pytest.skip(f"{backend} has no fused cross-entropy kernels")
    return kernels.cross_entropy_loss, kernels.cross_entropy_loss_backward


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_counts_are_what_the_contract_says(backend, reduction, weighted, label_smoothing):
    """counts = (sum of counted w_t, counted rows, W): the first two where a backend counts
    them (every backend for "sum" and "mean", cpp and torch for "none"; cuda and triton
    write 0 for "none"); W with label smoothing, 0 without it (not summed): every element
    written."""
    loss_kernel, _ = _fused_kernels(backend)
    torch.manual_seed(0)
    x = torch.randn(23, 40)
    target = torch.randint(0, 40, (23,))
    target[::3] = -7  # ignored
    weight = torch.rand(40) + 0.5 if weighted else None
    _, _, counts = loss_kernel(x, target, weight, -7, label_smoothing, 0.0, reduction)
    counted = target != -7
    w_t = torch.ones(23) if weight is None else weight[torch.where(counted, target, 0)]
    want = torch.tensor(
        [w_t[counted].double().sum().item(), counted.sum().item()], dtype=torch.float64
    )
    if reduction != "none" or backend in ("cpp", "torch"):
        torch.testing.assert_close(counts[:2], want, rtol=1e-14, atol=0)
    else:
        assert (counts[:2] == 0).all()
    if label_smoothing:
        total = 40.0 if weight is None else weight.double().sum().item()
        torch.testing.assert_close(counts[2].item(), total, rtol=1e-14, atol=0)
    else:
        assert counts[2].item() == 0.0


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
def test_the_backward_reads_no_count_it_does_not_need(backend, reduction, z_loss):
    """Without label smoothing no backward reads W (counts[2]), and only "mean" reads
    counts[0] and counts[1]: NaN there leaves dx bitwise as it was (a kernel that read one
    would turn dx NaN)."""
    loss_kernel, backward_kernel = _fused_kernels(backend)
    torch.manual_seed(1)
    x = torch.randn(9, 30)
    target = torch.randint(0, 30, (9,))
    target[4] = -100
    weight = torch.rand(30) + 0.5
    options = (-100, 0.0, z_loss, reduction)
    loss, lse, counts = loss_kernel(x, target, weight, *options)
    grad = torch.randn(loss.shape)
    dx = backward_kernel(grad, None, x, target, weight, lse, counts, *options)
    assert dx.isfinite().all()
    poisoned = counts.clone()
    poisoned[2] = float("nan")
    if reduction != "mean":
        poisoned[:2] = float("nan")
    again = backward_kernel(grad, None, x, target, weight, lse, poisoned, *options)
    assert torch.equal(again, dx)


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="the extension is not built")
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_the_cpp_loss_raises_on_the_first_bad_target_in_row_order(reduction):
    """The fused C++ loss checks its targets in row order, after the rows' walk (which reads
    class 0 for a bad target): the first bad one is named, whatever the threads, and nothing
    is read outside a row."""
    x = torch.randn(4000, 3)
    target = torch.randint(0, 3, (4000,))
    target[2500] = 3
    target[3999] = -5
    target[100] = -1  # ignored
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with pytest.raises(IndexError, match="^Target 3 is out of bounds"):
                torch.ops.stablekernels._fused_cross_entropy_loss(
                    x, target, None, -1, 0.1, 0.0, reduction
                )
    finally:
        torch.set_num_threads(previous)
