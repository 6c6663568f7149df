"""The triton backend's fused linear cross-entropy forward
(stablekernels/backends/triton/linear_cross_entropy.py: ``tl.dot`` with the online lse in
its epilogue), under the Triton interpreter: its per-row pieces (nll, smooth, lse) against
the float64 formula (F.linear, then the cross-entropy's pieces) over the options, the
dtypes, shapes that are no multiple of the blocks and several vocabulary splits; the public
``sk.linear_cross_entropy(..., backend="triton")`` with and without it; bitwise
determinism. Shapes are tiny: the interpreter runs each program in numpy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import stablekernels as sk
from stablekernels import _linear_tiles, backends

from .bounds import assert_gradients_within, assert_within, linear_cross_entropy_bounds
from .conftest import CPU_BACKENDS

pytestmark = pytest.mark.skipif(
    "triton" not in CPU_BACKENDS, reason="triton on CPU tensors (TRITON_INTERPRET=1)"
)

# (rows, hidden, vocab): none a multiple of BLOCK_M (32 or 64), BLOCK_K (16, 32 or 64) or
# BLOCK_N (32, 64 or 128); 70 rows take two row blocks (three in float64).
SHAPE = (70, 40, 300)
OPTIONS = {
    "plain": {},
    "bias": {"bias": True},
    "smoothing": {"smoothing": True},
    "weight+smoothing": {"weight": True, "smoothing": True, "bias": True},
    "temperature": {"temperature": 0.7, "bias": True},
    "softcap": {"softcap": 3.0, "temperature": 1.3, "smoothing": True, "weight": True},
}
# Input dtypes (x, W): the accumulation dtype is float64 if either is, else float32.
DTYPES = {
    "fp32": (torch.float32, torch.float32),
    "fp64": (torch.float64, torch.float64),
    "fp16": (torch.float16, torch.float16),
    "fp16 x, fp32 W": (torch.float16, torch.float32),
}


@pytest.fixture
def fused():
    from stablekernels.backends.triton import linear_cross_entropy

    return linear_cross_entropy


def _problem(shape=SHAPE, dtypes=(torch.float32, torch.float32), bias=False, seed=0):
    rows, hidden, vocab = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=g).to(dtypes[0])
    w = (torch.randn(vocab, hidden, generator=g) / 3).to(dtypes[1])
    b = torch.randn(vocab, generator=g).to(dtypes[1]) if bias else None
    target = torch.randint(0, vocab, (rows,), generator=g)
    class_weight = torch.rand(vocab, generator=g, dtype=torch.float64) + 0.5
    return x, w, b, target, class_weight


def _reference(x, w, b, target, weight, temperature=1.0, softcap=None):
    """(nll, smooth, lse) per row in float64 from the float64 logits: lse - z_t,
    sum_j w_j (lse - z_j) and logsumexp(z)."""
    z = F.linear(x.double(), w.double(), None if b is None else b.double()) / temperature
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    lse = torch.logsumexp(z, 1)
    nll = lse - z.gather(1, target[:, None])[:, 0]
    cw = torch.ones_like(lse[:1]) if weight is None else weight.double()
    return nll, ((lse[:, None] - z) * cw).sum(1), lse


def _pieces(fused, x, w, b, target, class_weight, option, splits):
    acc = torch.float64 if torch.float64 in (x.dtype, w.dtype) else torch.float32
    weight = class_weight.to(acc) if option.get("weight") else None
    smoothing = option.get("smoothing", False)
    got = fused.merged_splits(
        x, w, b, target, weight, option.get("softcap"), option.get("temperature", 1.0),
        smoothing, splits,
    )  # fmt: skip
    ref = _reference(x, w, b, target, weight, option.get("temperature", 1.0), option.get("softcap"))
    return got, ref, smoothing, acc


def _check(got, ref, smoothing, acc):
    nll, smooth, lse = got
    assert all(t.dtype == torch.float64 and t.shape == ref[0].shape for t in got)
    tol = 1e-12 if acc == torch.float64 else 1e-5
    torch.testing.assert_close(lse, ref[2], rtol=tol, atol=tol)
    torch.testing.assert_close(nll, ref[0], rtol=tol, atol=tol)
    if smoothing:
        torch.testing.assert_close(smooth, ref[1], rtol=tol, atol=tol)
    else:
        assert not smooth.any()


@pytest.mark.parametrize("splits", [1, 2, 3, 0])
@pytest.mark.parametrize("option", OPTIONS)
def test_pieces_match_the_float64_formula_over_splits(fused, option, splits):
    """float32: 5 vocabulary tiles of 64 in 1, 2 (tiles 3 + 2) or 3 splits (2 + 2 + 1; 0:
    the plan's choice), 2 row blocks, 3 steps of BLOCK_K = 16 (the last one padded)."""
    x, w, b, target, class_weight = _problem(bias=OPTIONS[option].get("bias", False))
    plan = fused.plan(SHAPE[0], SHAPE[2], x.dtype, w.dtype, None if b is None else b.dtype, splits)
    assert plan.splits == (splits or plan.splits) and plan.splits * plan.split_size >= SHAPE[2]
    _check(*_pieces(fused, x, w, b, target, class_weight, OPTIONS[option], splits))


@pytest.mark.parametrize("dtypes", DTYPES)
@pytest.mark.parametrize("option", OPTIONS)
def test_pieces_match_the_float64_formula_in_every_dtype(fused, option, dtypes):
    """Halves of one dtype go to tl.dot as they are (products exact in float32), a mix is
    converted to float32, float64 is computed in float64: each within its accumulation
    dtype's rounding of the exact result on the given inputs."""
    x, w, b, target, class_weight = _problem(
        dtypes=DTYPES[dtypes], bias=OPTIONS[option].get("bias", False)
    )
    _check(*_pieces(fused, x, w, b, target, class_weight, OPTIONS[option], 2))


def test_strided_inputs_and_a_hidden_size_below_one_block(fused):
    """x a column slice and W a transposed (H, V) buffer: the kernel reads them through
    their strides; H = 5 is one padded BLOCK_K step; one row."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 10, generator=g)[:, ::2]
    w = torch.randn(5, 130, generator=g).t()
    b = torch.randn(130, generator=g)
    target = torch.randint(0, 130, (9,), generator=g)
    assert not x.is_contiguous() and not w.is_contiguous()
    for rows in (9, 1):
        got = fused.merged_splits(x[:rows], w, b, target[:rows], None, 2.0, 1.0, True, 2)
        _check(got, _reference(x[:rows], w, b, target[:rows], None, softcap=2.0), True, x.dtype)


def test_a_confident_prediction_keeps_relative_precision(fused):
    """Logits [0, -20], target 0: nll = log1p(exp(-20)) = 2.0611536e-09 to float32's
    relative precision (lse - z_t rounded in float32 would be 0)."""
    x = torch.ones(1, 1)
    w = torch.tensor([[0.0], [-20.0]])
    nll, _, lse = fused.linear_cross_entropy(x, w, None, torch.tensor([0]), None, None, 1.0, False)
    exact = torch.tensor(-20.0, dtype=torch.float64).exp().log1p()
    torch.testing.assert_close(nll[0], exact, rtol=1e-6, atol=0)
    torch.testing.assert_close(lse[0], exact, rtol=1e-6, atol=0)


def test_deterministic_bitwise(fused):
    x, w, b, target, class_weight = _problem(bias=True)
    for splits in (3, 0):
        runs = [
            fused.merged_splits(x, w, b, target, class_weight.float(), 3.0, 0.7, True, splits)
            for _ in range(2)
        ]
        for a, c in zip(*runs, strict=True):
            assert torch.equal(a, c)


PUBLIC_OPTIONS = {
    "plain": {},
    "everything": {"weight": True, "label_smoothing": 0.2, "z_loss": 1e-2, "bias": True},
    "softcap": {"softcap": 3.0, "temperature": 1.3, "label_smoothing": 0.1},
}


def _public(x, w, b, target, class_weight, option, **kw):
    return sk.linear_cross_entropy(
        x,
        w,
        target,
        linear_bias=b,
        weight=class_weight.float() if option.get("weight") else None,
        label_smoothing=option.get("label_smoothing", 0.0),
        z_loss=option.get("z_loss", 0.0),
        softcap=option.get("softcap"),
        temperature=option.get("temperature", 1.0),
        backend="triton",
        **kw,
    )


@pytest.fixture
def plans(monkeypatch, fused):
    """Counts the fused kernel's launches (each calls plan twice: launch and merge)."""
    calls = []
    plan = fused.plan

    def counting(*args, **kwargs):
        calls.append(args)
        return plan(*args, **kwargs)

    monkeypatch.setattr(fused, "plan", counting)
    return calls


@pytest.mark.parametrize("option", PUBLIC_OPTIONS)
def test_public_loss_with_and_without_the_fused_forward(monkeypatch, plans, option):
    """The same loss and lse (ignored rows 0) to float32 rounding, and the float64 formula."""
    opt = PUBLIC_OPTIONS[option]
    x, w, b, target, class_weight = _problem(shape=(21, 40, 300), bias=opt.get("bias", False))
    target[::7] = -100
    with torch.no_grad():
        loss, lse = _public(x, w, b, target, class_weight, opt, reduction="none", return_lse=True)
        mean = _public(x, w, b, target, class_weight, opt)
        assert len(plans) == 4
        monkeypatch.setattr(_linear_tiles, "USE_FUSED_FORWARD", False)
        tile_loss, tile_lse = _public(
            x, w, b, target, class_weight, opt, reduction="none", return_lse=True
        )
        tile_mean = _public(x, w, b, target, class_weight, opt)
        assert len(plans) == 4
    assert loss.dtype == tile_loss.dtype == torch.float32
    torch.testing.assert_close(loss, tile_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, tile_lse, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mean, tile_mean, rtol=1e-5, atol=1e-6)
    assert not loss[::7].any()
    counted = target != -100
    weight = class_weight if opt.get("weight") else None
    nll, smooth, ref_lse = _reference(
        x, w, b, target.clamp(min=0), weight, opt.get("temperature", 1.0), opt.get("softcap")
    )
    e = opt.get("label_smoothing", 0.0)
    w_t = 1.0 if weight is None else weight[target.clamp(min=0)]
    ref = (1 - e) * w_t * nll + (e / w.shape[0]) * smooth + opt.get("z_loss", 0.0) * ref_lse**2
    ref = torch.where(counted, ref, 0.0)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)


def _gradient_problem():
    """The inputs, target, per-row gradient g, the float64 loss and its gradients, and the
    derived bounds (tests/bounds.py) on our loss's and gradients' errors."""
    x, w, b, target, _ = _problem(shape=(21, 40, 300), bias=True)
    target[5] = -100
    g = torch.linspace(0.5, 1.5, len(target))
    ref_leaves = [t.double().requires_grad_() for t in (x, w, b)]
    z = 3.0 * torch.tanh(F.linear(*ref_leaves) / 3.0)
    ref = F.cross_entropy(z, target, reduction="none", label_smoothing=0.1)
    bounds = linear_cross_entropy_bounds(x, w, b, target, g, label_smoothing=0.1, softcap=3.0)
    return (x, w, b), target, g, ref, torch.autograd.grad(ref, ref_leaves, g.double()), bounds


def _loss(x, w, b, target):
    return sk.linear_cross_entropy(
        x, w, target, linear_bias=b, reduction="none", label_smoothing=0.1, softcap=3.0,
        backend="triton",
    )  # fmt: skip


def test_with_autograd_gradients_the_forward_takes_the_tiles(plans):
    """reduction="none", inputs requiring grad: the lse comes from the same torch.mm as the
    backward's recomputed logits (no fused launch). Loss and gradients within the bounds
    derived from float32 arithmetic in any summation order (tests/bounds.py), as
    tests/test_linear_cross_entropy.py asks of every backend."""
    inputs, target, g, ref, ref_grads, bounds = _gradient_problem()
    leaves = [t.clone().requires_grad_() for t in inputs]
    loss = _loss(*leaves, target)
    assert not plans
    assert_within(loss, ref, bounds.loss, "loss")
    assert_gradients_within(torch.autograd.grad(loss, leaves, g), ref_grads, bounds.grads)


def test_the_fused_forward_then_the_tiles_backward(plans):
    """Under torch.func.grad the op does not see the gradient coming: the fused forward,
    then the tiles' backward (gradients stay as they were); its lse and the recomputed
    logits come from different products, each within the matmul bound, which the derived
    bounds allow for (the same bounds as with autograd)."""
    inputs, target, g, ref, ref_grads, bounds = _gradient_problem()

    def weighted(x, w, b):
        return (_loss(x, w, b, target) * g).sum()

    grads = torch.func.grad(weighted, argnums=(0, 1, 2))(*inputs)
    assert len(plans) == 2
    assert_gradients_within(grads, ref_grads, bounds.grads)


def test_entropy_stays_on_the_tiles(plans):
    x, w, b, target, _ = _problem(shape=(9, 40, 300))
    with torch.no_grad():
        loss, entropy = sk.linear_cross_entropy(
            x, w, target, reduction="none", return_entropy=True, backend="triton"
        )
    assert not plans
    z = F.linear(x.double(), w.double())
    ref = -(z.softmax(1) * z.log_softmax(1)).sum(1)
    torch.testing.assert_close(entropy.double(), ref, rtol=1e-5, atol=1e-6)


def test_special_values_as_the_tiles(monkeypatch, plans):
    """A class whose bias is -inf (its logit -inf: the smoothing term inf), a row with a
    NaN, a row with a +inf: the same losses (NaN where the lse is not finite) as the
    tiles give."""
    x, w, b, target, _ = _problem(shape=(12, 40, 300), bias=True)
    b[7] = float("-inf")
    x[2, 3] = float("nan")
    x[4, 1] = float("inf")

    def losses():
        with torch.no_grad():
            return [
                sk.linear_cross_entropy(
                    x,
                    w,
                    target,
                    linear_bias=b,
                    reduction="none",
                    label_smoothing=e,
                    return_lse=True,
                    backend="triton",
                )  # fmt: skip
                for e in (0.0, 0.1)
            ]

    fused = losses()
    assert len(plans) == 4
    monkeypatch.setattr(_linear_tiles, "USE_FUSED_FORWARD", False)
    for (loss, lse), (tile_loss, tile_lse) in zip(fused, losses(), strict=True):
        torch.testing.assert_close(loss, tile_loss, rtol=1e-5, atol=1e-6, equal_nan=True)
        torch.testing.assert_close(lse, tile_lse, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert fused[0][0][2].isnan() and fused[1][0][0].isinf()


def test_the_fused_kernel_is_an_optional_kernel_of_the_contract():
    kernels = backends.BACKENDS["triton"].kernels()
    assert (
        backends.argument_names(kernels.linear_cross_entropy)
        == (backends.KERNEL_ARGUMENTS["linear_cross_entropy"])
    )
    assert backends.BACKENDS["torch"].kernels().linear_cross_entropy is None
