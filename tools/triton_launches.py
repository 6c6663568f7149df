"""Every launch the Triton backend makes, recorded instead of run.

:func:`recorded_launches` replaces ``wrap_triton`` in the backend's modules and
``torch.cuda.device`` by recorders, so that calling a ``_triton_*`` op on fake CUDA tensors
(``FakeTensorMode``; no GPU needed) runs its launcher and records each kernel launch: the
kernel, its grid, its arguments (tensors as their dtypes), its keyword options and the
CUDA device made current around it. :func:`launch_matrix` calls every launcher over the
shapes and dtypes that take each of its branches. tools/gpu_resources.py compiles what
they record for real GPUs; tests/test_triton_launches.py checks the launches themselves.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from stablekernels._numerics import accumulation_dtype
from stablekernels.backends.triton import (
    cross_entropy,
    cross_entropy_backward,
    linear_cross_entropy,
    logsumexp,
    masked_softmax,
    masked_softmax_backward,
    softmax,
    tiles,
)

LAUNCHING_MODULES = (
    softmax,
    logsumexp,
    cross_entropy,
    cross_entropy_backward,
    linear_cross_entropy,
    masked_softmax,
    tiles,
    masked_softmax_backward,
)
# Dtype pairs (input, output) of softmax: one dtype, and halves written as float32.
SOFTMAX_PAIRS = (
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.float32),
)
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Row lengths that take every block size of common.launch_shape (16 .. MAX_BLOCK_N) and the
# split path (several parts of common.SPLIT_CHUNK); ROWS rows. Both divisible by 16, as
# most shapes are: Triton compiles one variant per specialisation of an integer argument
# (== 1, divisible by 16), and the aligned one is the vectorised one.
ROW_LENGTHS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 3 * 8192)
ROWS = 64
# The row length at which rows along dim 0 (strided) are launched too.
STRIDED_ROW_LENGTH = 1024
# Class counts of cross-entropy: within one tile (cross_entropy.TILE) and over several.
CLASS_COUNTS = (1024, 32000)
# Linear cross-entropy: (rows, hidden, vocab) of an output layer, every count divisible by
# 16 (as are the plan's row blocks and split size here), and the (input, linear_weight)
# dtypes: one dtype each, and bf16 activations with fp32 weights (converted to fp32).
LINEAR_SHAPE = (4096, 1024, 32000)
LINEAR_DTYPES = (
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
)
# The linear cross-entropy's tile epilogues (backends/triton/tiles.py): tiles of TILE_WIDTH
# classes (_linear_tiles' widest) and the whole LINEAR_SHAPE vocabulary; options (class
# weights, smoothing, entropy, softcap, temperature).
TILE_WIDTH = 4096
TILE_OPTIONS = (
    (False, False, False, None, 1.0),
    (False, True, False, None, 1.0),
    (False, False, True, None, 1.0),
    (True, True, True, 30.0, 0.7),
)
# Masked softmax: (B, H, S_q) = 64 rows of each length (one of each block size class and the
# split path), x dtypes (y in the same dtype), masks (none, a bool key-padding mask
# expanded from (B, 1, 1, S), a full additive mask), causal or not; every mode at the widest
# block and on the split path, softmax (mode 0) at the others.
MASKED_ROW_LENGTHS = (128, 1024, 8192, 3 * 8192)
MASKED_ALL_MODES_FROM = 8192
MASKED_BHS = (2, 4, 8)


@dataclasses.dataclass(frozen=True)
class Launch:
    kernel: object  # the triton.JITFunction (or the interpreter's wrapper of it)
    grid: tuple
    args: tuple  # tensors replaced by their dtypes
    shapes: tuple  # the tensor arguments' shapes (None for the others)
    options: dict  # constexprs and launch options (num_warps ...)
    device: torch.device | None  # the CUDA device current at the launch, None if none set

    @property
    def name(self) -> str:
        fn = getattr(self.kernel, "fn", self.kernel)
        return getattr(fn, "__name__", repr(fn))


@contextlib.contextmanager
def recorded_launches() -> Iterator[list[Launch]]:
    """Within the block, Triton launches of the backend are recorded into the yielded list
    (and not run); ``torch.cuda.device`` only sets the device the recorder reports."""
    launches: list[Launch] = []
    current: list[torch.device | None] = [None]

    class RecordingDevice:
        def __init__(self, device):
            self.device = torch.device(device)

        def __enter__(self):
            self.previous = current[0]
            current[0] = self.device

        def __exit__(self, *exc):
            current[0] = self.previous

    def as_arg(value):
        return value.dtype if isinstance(value, torch.Tensor) else value

    def shape(value):
        return tuple(value.shape) if isinstance(value, torch.Tensor) else None

    def wrap_triton(kernel):
        class Launcher:
            def __getitem__(self, grid):
                def launch(*args, **options):
                    launches.append(
                        Launch(
                            kernel,
                            tuple(grid),
                            tuple(map(as_arg, args)),
                            tuple(map(shape, args)),
                            options,
                            current[0],
                        )
                    )

                return launch

        return Launcher()

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(torch.cuda, "device", RecordingDevice))
        for module in LAUNCHING_MODULES:
            stack.enter_context(mock.patch.object(module, "wrap_triton", wrap_triton))
        yield launches


def launch_matrix(device: str = "cuda:0") -> list[Launch]:
    """The launches of every ``_triton_*`` op over ROW_LENGTHS (rows along the last dim and,
    for softmax at STRIDED_ROW_LENGTH, along dim 0), the dtypes the ops take, log and not,
    cross-entropy with and without class weights and label smoothing, and the fused linear
    cross-entropy over LINEAR_DTYPES with and without bias, smoothing (with and without
    class weights) and softcap, the tile epilogues (TILE_OPTIONS), and the masked softmax
    (MASKED_ROW_LENGTHS, masks, causal):
    fake tensors on ``device``."""
    ops = torch.ops.stablekernels
    with FakeTensorMode(), recorded_launches() as launches:
        for n in ROW_LENGTHS:
            for x_dtype, y_dtype in SOFTMAX_PAIRS:
                for log in (False, True):
                    x = torch.empty(ROWS, n, dtype=x_dtype, device=device)
                    y = ops._triton_softmax(x, 1, y_dtype, log)
                    ops._triton_softmax_backward(y, y, 1, x_dtype, log)
                    if n == STRIDED_ROW_LENGTH:
                        ops._triton_softmax(x.t(), 0, y_dtype, log)
            for dtype in DTYPES:
                x = torch.empty(ROWS, n, dtype=dtype, device=device)
                acc = accumulation_dtype(dtype)
                ops._triton_logsumexp(x, 1, False)
                lse = torch.empty(ROWS, dtype=torch.float64, device=device)
                ops._triton_logsumexp_backward(
                    torch.empty(ROWS, dtype=dtype, device=device), x, lse, 1
                )
        for classes in CLASS_COUNTS:
            for dtype in DTYPES:
                acc = accumulation_dtype(dtype)
                logits = torch.empty(ROWS, classes, dtype=dtype, device=device)
                target = torch.empty(ROWS, dtype=torch.int64, device=device)
                for weight in (None, torch.empty(classes, dtype=acc, device=device)):
                    for smoothing in (False, True):
                        ops._triton_cross_entropy(logits, target, weight, smoothing)
                    terms = torch.empty(ROWS, 5, dtype=acc, device=device)
                    ops._triton_cross_entropy_backward(logits, target, weight, terms)
                    lse = torch.empty(ROWS, dtype=torch.float64, device=device)
                    for reduction in ("none", "mean", "sum"):
                        for smoothing, z_loss in ((0.0, 0.0), (0.1, 1e-3)):
                            options = (-100, smoothing, z_loss, reduction)
                            _, _, counts = ops._triton_cross_entropy_loss(
                                logits, target, weight, *options
                            )
                            grad = torch.empty(
                                ROWS if reduction == "none" else (), dtype=acc, device=device
                            )
                            ops._triton_cross_entropy_loss_backward(
                                grad, lse, logits, target, weight, lse, counts, *options
                            )
        rows, hidden, vocab = LINEAR_SHAPE
        target = torch.empty(rows, dtype=torch.int64, device=device)
        for x_dtype, w_dtype in LINEAR_DTYPES:
            acc = accumulation_dtype(x_dtype, w_dtype)
            x = torch.empty(rows, hidden, dtype=x_dtype, device=device)
            w = torch.empty(vocab, hidden, dtype=w_dtype, device=device)
            class_weight = torch.empty(vocab, dtype=acc, device=device)
            for bias in (None, torch.empty(vocab, dtype=w_dtype, device=device)):
                for weight, smoothing in ((None, False), (None, True), (class_weight, True)):
                    for softcap in (None, 30.0):
                        ops._triton_linear_cross_entropy_parts(
                            x, w, bias, target, weight, softcap, 1.0, smoothing, 0
                        )
        # The tile epilogues of _linear_tiles: a tile of TILE_WIDTH classes (the first, which
        # initialises the state, and a later one) and the whole vocabulary as one tile (the
        # forward with gradient), each option on at least once.
        for acc in (torch.float32, torch.float64):
            target = torch.empty(ROWS, dtype=torch.int64, device=device)
            class_weight = torch.empty(LINEAR_SHAPE[2], dtype=acc, device=device)
            state = torch.empty(ROWS, 10, dtype=torch.float64, device=device)
            terms = torch.empty(ROWS, 5, dtype=acc, device=device)
            g_entropy = torch.empty(ROWS, dtype=acc, device=device)
            for width, start in ((TILE_WIDTH, 0), (TILE_WIDTH, TILE_WIDTH), (LINEAR_SHAPE[2], 0)):
                tile = torch.empty(ROWS, width, dtype=acc, device=device)
                for weight, smoothing, entropy, softcap, temperature in TILE_OPTIONS:
                    weight = class_weight if weight else None
                    ops._triton_cross_entropy_tile(
                        tile, target, start, weight, softcap, temperature, smoothing, entropy,
                        state,
                    )  # fmt: skip
                    ops._triton_cross_entropy_tile_backward(
                        tile, target, start, weight, terms, softcap, temperature,
                        g_entropy if entropy else None,
                    )  # fmt: skip
        b, h, sq = MASKED_BHS
        for n in MASKED_ROW_LENGTHS:
            for dtype in DTYPES:
                acc = accumulation_dtype(dtype)
                x = torch.empty(b, h, sq, n, dtype=dtype, device=device)
                key = torch.empty(b, 1, 1, n, dtype=torch.bool, device=device)
                additive = torch.empty(b, h, sq, n, dtype=acc, device=device)
                for mask in (None, key.expand(x.shape), additive):
                    for causal_offset in (None, 0):
                        for mode in (0, 1, 2, 3) if n >= MASKED_ALL_MODES_FROM else (0,):
                            ops._triton_masked_softmax(x, mask, 0.125, causal_offset, dtype, mode)
                ops._triton_masked_softmax(x, None, 0.125, None, dtype, 0, 1)  # NaN rows
                lse = torch.empty(b * h * sq, dtype=torch.float64, device=device)
                for log in (False, True):
                    ops._triton_masked_softmax_backward(x, x, lse, 0.125, log, dtype)
    return launches
