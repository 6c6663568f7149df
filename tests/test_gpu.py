"""The backends that serve CUDA tensors (cuda, triton, torch), on a GPU: values against the
float64 reference in every dtype (bf16 included), long rows (262144 and 1M+), strided
rows, special values, gradients, a tensor of more than 2^31 elements, CUDA graph capture
and a non-default stream. Skipped without a GPU (run by benchmarks/gpu_run.sh on the GPU
machine)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import stablekernels as sk
from stablekernels import backends

from . import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

GPU_BACKENDS = [b for b in backends.BACKENDS if backends.BACKENDS[b].supports("cuda")]
TOL = {torch.float32: 2e-6, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
SHAPES = [
    ((4, 1000), -1),
    ((64, 4096), -1),
    ((8, 50257), -1),
    ((2, 262144), -1),
    ((1, 1_100_000), -1),
    ((3, 5, 33), 1),
    ((1024, 64), 0),
    ((7, 300), -1),
]


@pytest.fixture(params=GPU_BACKENDS)
def gpu_backend(request):
    return request.param


def _close(ours, ref, dtype, name):
    ref = ref.to(ours.device)
    scale = ref.abs().nan_to_num(posinf=0, neginf=0).max().clamp(min=1.0)
    atol = TOL[dtype] * (scale if name == "logsumexp" else 1)
    torch.testing.assert_close(ours.double(), ref, rtol=TOL[dtype], atol=atol, equal_nan=True)


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("shape,dim", SHAPES)
def test_forward_and_backward_against_float64(gpu_backend, dtype, shape, dim):
    x = (torch.randn(shape, dtype=torch.float64) * 4).to(dtype)
    for name in ("softmax", "log_softmax", "logsumexp"):
        xc = x.cuda().requires_grad_()
        out = getattr(sk, name)(xc, dim, backend=gpu_backend)
        _close(out, getattr(reference, name)(x, dim), dtype, name)
        dy = torch.randn(out.shape, dtype=torch.float64).to(dtype)
        out.backward(dy.cuda())
        ref = reference.backward(name, x, dy, dim)
        scale = ref.abs().max().item()
        torch.testing.assert_close(
            xc.grad.double().cpu(), ref, rtol=TOL[dtype] * 4, atol=TOL[dtype] * 4 * scale
        )


def test_special_values(gpu_backend):
    inf, nan = float("inf"), float("nan")
    x = torch.tensor(
        [
            [-inf] * 4,
            [inf, 0, 1, 2],
            [nan, 0, 1, 2],
            [-inf, 0, 1, -inf],
            [3, 3, 3, -1],
            [0.5, -1.5, 2.0, 0.25],
        ]
    ).repeat(1, 700)
    for name in ("softmax", "log_softmax", "logsumexp"):
        ours = getattr(sk, name)(x.cuda(), -1, backend=gpu_backend).cpu()
        torch.testing.assert_close(ours, getattr(torch, name)(x, -1), equal_nan=True)


def test_more_than_2_to_the_31_elements(gpu_backend):
    x = torch.randn(2**21 + 3, 1024, dtype=torch.float16, device="cuda")  # 2^31 + 3072
    out = sk.logsumexp(x, -1, backend=gpu_backend)
    tail = x[-5:].float()
    torch.testing.assert_close(out[-5:].float(), torch.logsumexp(tail, -1), rtol=2e-3, atol=1e-2)
    y = sk.softmax(x, -1, backend=gpu_backend)
    torch.testing.assert_close(y[-5:].float(), torch.softmax(tail, -1), rtol=2e-3, atol=1e-4)


def test_cuda_graph_capture_and_replay(gpu_backend):
    x = torch.randn(64, 70000, device="cuda")
    static_in = x.clone()
    sk.softmax(static_in, backend=gpu_backend)  # warm-up (Triton compiles) outside capture
    sk.logsumexp(static_in, backend=gpu_backend)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = sk.softmax(static_in, backend=gpu_backend)
        lse = sk.logsumexp(static_in, backend=gpu_backend)
    static_in.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(y, torch.softmax(static_in, -1))
    torch.testing.assert_close(lse, torch.logsumexp(static_in, -1))


def test_non_default_stream(gpu_backend):
    x = torch.randn(256, 4096, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y = sk.log_softmax(x, backend=gpu_backend)
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(y, torch.log_softmax(x, -1))


def test_cross_entropy_never_synchronises_and_is_captured(gpu_backend):
    """Targets are checked on the device (no host sync), so a training step's loss can be
    captured in a CUDA graph."""
    x = torch.randn(64, 32000, device="cuda", requires_grad=True)
    target = torch.randint(0, 32000, (64,), device="cuda")
    weight = torch.rand(32000, device="cuda")
    sk.cross_entropy(x, target, weight, backend=gpu_backend).backward()  # warm-up
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = sk.cross_entropy(x, target, weight, label_smoothing=0.1, backend=gpu_backend)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    static_x = x.detach().clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = sk.cross_entropy(static_x, target, backend=gpu_backend)
    static_x.copy_(torch.randn_like(static_x))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(loss, F.cross_entropy(static_x, target))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_tensor_on_another_device_than_the_current_one(gpu_backend):
    x = torch.randn(64, 20000, device="cuda:1", requires_grad=True)
    target = torch.randint(0, 20000, (64,), device="cuda:1")
    with torch.cuda.device(0):
        y = sk.softmax(x, backend=gpu_backend)
        lse = sk.logsumexp(x, backend=gpu_backend)
        loss = sk.cross_entropy(x, target, backend=gpu_backend)
        (y.sum() + lse.sum() + loss).backward()
    torch.testing.assert_close(y, torch.softmax(x, -1))
    torch.testing.assert_close(lse, torch.logsumexp(x, -1))
    torch.testing.assert_close(loss, F.cross_entropy(x, target))


def test_one_row_of_more_than_65535_split_parts(gpu_backend):
    """5.4e8 elements in one row: more parts than a grid's y dimension holds."""
    n = 65536 * 8192 + 12345
    x = torch.randn(n, device="cuda", requires_grad=True)  # 2.2 GB
    lse = sk.logsumexp(x, 0, backend=gpu_backend)
    exact = torch.logsumexp(x.detach().double(), 0)
    torch.testing.assert_close(lse.double(), exact, rtol=1e-6, atol=0)
    lse.backward()
    probability = torch.exp(x.detach()[-5:].double() - exact)  # about 2e-9 each
    torch.testing.assert_close(x.grad[-5:].double(), probability, rtol=1e-4, atol=0)
    y = sk.softmax(x.detach(), 0, backend=gpu_backend)
    torch.testing.assert_close(y[-5:].double(), probability, rtol=1e-4, atol=0)


@pytest.mark.skipif("triton" not in GPU_BACKENDS, reason="the triton backend is not available")
def test_opcheck_of_the_triton_ops():
    # Under the interpreter the fake tracing of triton_op cannot trace interpreted kernels,
    # so these run on a GPU only.
    x = torch.randn(4, 37, device="cuda", requires_grad=True)
    long = torch.randn(2, 20000, device="cuda")
    ops = torch.ops.stablekernels
    y = torch.softmax(x.detach(), -1)
    for op, args in [
        (ops._triton_softmax.default, (x, -1, torch.float32, False)),
        (ops._triton_softmax.default, (long, 1, torch.float32, True)),
        (ops._triton_logsumexp.default, (long, -1, False)),
        (ops._triton_softmax_backward.default, (torch.randn_like(y), y, 1, torch.float32, False)),
    ]:
        results = torch.library.opcheck(op, args)
        assert set(results.values()) == {"SUCCESS"}, (op, results)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("keys", [37, 2048, 20000])
def test_masked_softmax_matches_the_cpu_reference(gpu_backend, dtype, keys):
    """The attention softmax on the GPU (strided (B,1,1,S) bool mask, an additive (1,H,1,S)
    bias, causal limits, a row with nothing kept) against the torch backend on the CPU in
    float64, forward and backward."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, keys, generator=g, dtype=torch.float64) * 4
    keep = torch.rand(2, 1, 1, keys, generator=g) > 0.3
    keep[1] = False
    bias = torch.randn(1, 3, 1, keys, generator=g, dtype=torch.float64)
    for mask, offset in ((keep, keys - 5), (bias, 1), (None, -2)):
        for name in ("softmax", "log_softmax", "logsumexp"):
            kw = {"scale": 0.3, "mask": mask, "causal": True, "causal_offset": offset}
            xg = x.to(dtype).cuda().requires_grad_()
            mg = None if mask is None else mask.cuda()
            ours = getattr(sk, name)(xg, -1, backend=gpu_backend, **{**kw, "mask": mg})
            xr = x.to(dtype).double().requires_grad_()
            ref = getattr(sk, name)(xr, -1, backend="torch", **kw)
            finite = ref.isfinite()
            assert torch.equal(ours.isfinite().cpu(), finite), name
            torch.testing.assert_close(ours.double().cpu()[finite], ref[finite],
                                       rtol=TOL[dtype], atol=TOL[dtype])  # fmt: skip
            grad = torch.randn(ref.shape, generator=g, dtype=torch.float64)
            (dx,) = torch.autograd.grad(ours, xg, grad.to(dtype).cuda())
            (dr,) = torch.autograd.grad(ref, xr, grad.to(dtype).double())
            torch.testing.assert_close(dx.double().cpu(), dr, rtol=4 * TOL[dtype],
                                       atol=4 * TOL[dtype])  # fmt: skip
