"""Triton cross-entropy from logits, class-index targets: the two kernels of the contract
(stablekernels.backends.Kernels), formulas in docs/design.md.

Forward: one program per row streams the row in tiles, merging each tile's (m, s') into the
row's; with label smoothing it also keeps sum_c w_c (m - x_c), moved to the new max as
a + (m_new - m) W at each merge (every term >= 0). It writes the per-row pieces

    nll = (m - x_t) + log1p(s'),  smooth = sum_c w_c (m - x_c) + W log1p(s'),  lse

in float64; the router combines them with the options.

Targets must be in [0, classes): the kernels device_assert it (the CPU router checks it on
the host first). Every grid is 1-D and launches run on the logits' device.

Backward (cross_entropy_backward.py, with the helpers here): one program per (row, tile), a
pure map over the per-row terms the router gives:

    dx_c = p_c * coef - smooth * w_c - [c == t] * one_hot,   p_c = exp((x_c - hi) - lo)

The fused kernels of the contract, ``cross_entropy_loss`` and ``cross_entropy_loss_backward``,
are the same two kernels with the per-row algebra of csrc/include/stablekernels/
cross_entropy_rows.h inside (their EPILOGUE / PROLOGUE flags): the ignore mask, the target
check, the class weight, smoothing, z-loss and the reduction. Forward: the row kernel writes
each row's loss ("none"), or its parts of the sums to a float64 scratch ("sum", "mean"), which
one single-program kernel then adds in a fixed order (blocks of rows, each lane in row order,
then one tree sum: deterministic) into the loss and ``counts``; with "none", program 0 of
the row kernel writes W (``counts[2]``, all its backward reads; 0 without label smoothing,
which reads none). So the forward is one
launch ("none") or two, the backward one (each program derives its row's terms from the
loss's gradient), and nothing else touches the data (but for CPU tensors, whose targets are
checked on the host: the interpreter skips device_assert). The options' floats go to the
kernels as their float64 bit patterns (a Python float argument of a Triton kernel is
float32).
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op, wrap_triton

from ..._numerics import accumulation_dtype
from .. import torch_ce
from . import common

TILE = 2048
# Rows one program of the fused forward's reduction (and of its counts) reads at a time.
REDUCE_BLOCK = 1024
# The fused kernels' reductions, as the header's enum.
_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


def _check_classes(op: str, classes: int) -> None:
    if classes == 0:
        raise RuntimeError(
            f"{op}: expects logits with at least one class (the stablekernels router guarantees it)"
        )


def _reduction_code(op: str, reduction: str) -> int:
    try:
        return _REDUCTIONS[reduction]
    except KeyError:
        raise ValueError(
            f"{op}: reduction must be 'none', 'mean' or 'sum', not {reduction!r}"
        ) from None


def _check_host_targets(target: torch.Tensor, ignore_index: int, classes: int) -> None:
    """CPU tensors run under the interpreter, which skips device_assert (debug=True or not):
    their targets are checked on the host, IndexError in torch's words, where that waits for
    nothing (torch_ce.check_targets). Never for CUDA tensors, fake ones or under tracing."""
    if target.device.type == "cpu" and not is_fake(target) and not torch.compiler.is_compiling():
        torch_ce.check_targets(target, ignore_index, classes)


def _f64_bits(value: float) -> int:
    """The float64 bit pattern of ``value`` as a signed int64 (see :func:`_f64`)."""
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


@triton.jit
def _f64(bits):
    """The float64 whose bit pattern :func:`_f64_bits` gave: the options' floats reach the
    kernels exactly (a Python float argument would be float32)."""
    return tl.cast(bits, tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def _is_finite(v):
    return (v == v) & (tl.abs(v) != float("inf"))


@triton.jit
def _target(T_ptr, row, stride_t, ignore_index, classes, FUSED: tl.constexpr):
    """(the class row ``row`` reads, whether it counts); device_assert that a counted target
    is a class. Unfused, every row counts (the router gave readable targets)."""
    t = tl.load(T_ptr + row * stride_t)
    if FUSED:
        counted = t != ignore_index
        tl.device_assert(
            (t == ignore_index) | ((t >= 0) & (t < classes)), "cross_entropy: target out of bounds"
        )
        t = tl.where(counted, t, 0)
    else:
        counted = t == t
        tl.device_assert((t >= 0) & (t < classes), "cross_entropy: target out of bounds")
    return t, counted


@triton.jit
def _class_weight(W_ptr, t, counted, HAS_WEIGHT: tl.constexpr):
    """w_t of a row in float64 (1 without weights), 0 where the row does not count."""
    if HAS_WEIGHT:
        w_t = tl.load(W_ptr + t).to(tl.float64)
    else:
        w_t = tl.full([], 1.0, tl.float64)
    return tl.where(counted, w_t, 0.0)


@triton.jit
def _write_counts(
    T_ptr,
    W_ptr,
    COUNTS_ptr,
    rows,
    classes,
    stride_t,
    ignore_index,
    HAS_WEIGHT: tl.constexpr,
    BLOCK: tl.constexpr,
    SMOOTH: tl.constexpr,
    ROW_COUNTS: tl.constexpr = True,
):
    """Writes counts = (sum of counted w_t, counted rows, W) in float64, summed in a fixed
    order (each lane in row order, then one tree sum); returns the first two. Without
    ROW_COUNTS (reduction "none", whose backward reads W only) the rows are not walked and
    counts[0] and counts[1] are 0, so one program does not walk every target; without SMOOTH
    (no label smoothing: no backward reads W) W is not summed and counts[2] is 0. Every
    element is written: an op's output never holds uninitialised memory."""
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    weight = tl.zeros([BLOCK], tl.float64)
    number = tl.zeros([BLOCK], tl.float64)
    for start in range(0, rows if ROW_COUNTS else 0, BLOCK):
        r = start + lanes
        t = tl.load(T_ptr + r * stride_t, mask=r < rows, other=ignore_index)
        counted = (r < rows) & (t != ignore_index)
        if HAS_WEIGHT:
            # a counted target outside [0, classes) fails its row's device_assert: not read
            readable = counted & (t >= 0) & (t < classes)
            w_t = tl.load(W_ptr + tl.where(readable, t, 0), mask=readable, other=0.0)
            weight += w_t.to(tl.float64)
        else:
            weight += counted.to(tl.float64)
        number += counted.to(tl.float64)
    weight = tl.sum(weight, axis=0)
    number = tl.sum(number, axis=0)
    tl.store(COUNTS_ptr, weight)
    tl.store(COUNTS_ptr + 1, number)
    if SMOOTH:
        if HAS_WEIGHT:
            total = tl.zeros([BLOCK], tl.float64)
            for start in range(0, classes, BLOCK):
                c = start + lanes
                total += tl.load(W_ptr + c, mask=c < classes, other=0.0).to(tl.float64)
            tl.store(COUNTS_ptr + 2, tl.sum(total, axis=0))
        else:
            tl.store(COUNTS_ptr + 2, tl.cast(classes, tl.int64).to(tl.float64))
    else:
        tl.store(COUNTS_ptr + 2, tl.zeros([], tl.float64))
    return weight, number


# debug=True keeps the kernels' device_assert (targets in [0, classes)) in the compiled
# code: a bad target stops the kernel, as torch's nll_loss does, instead of a read outside
# the row; the routers check CPU targets on the host, where that costs no synchronisation.
@triton.jit(debug=True)
def _cross_entropy_fwd_kernel(
    X_ptr,
    T_ptr,
    W_ptr,
    NLL_ptr,
    SMOOTH_ptr,
    LSE_ptr,
    LOSS_ptr,
    COUNTS_ptr,
    rows,
    classes,
    stride_x,
    stride_t,
    ignore_index,
    e_bits,
    z_bits,
    HAS_WEIGHT: tl.constexpr,
    SMOOTH: tl.constexpr,
    ACC: tl.constexpr,
    TILE: tl.constexpr,
    EPILOGUE: tl.constexpr,
    REDUCTION: tl.constexpr,
    HAS_Z: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Per row: lse, nll = (m - x_t) + log1p(s') and, with smoothing,
    smooth = sum_c w_c (m - x_c) + W log1p(s').

    Without EPILOGUE: stores nll and smooth (float64); targets are in [0, classes).
    With EPILOGUE (the fused loss): a row counts when its target != ignore_index (else it
    reads class 0); stores the row's loss in LOSS ("none", REDUCTION 0), or its parts of the
    sums in the float64 scratch LOSS (2, rows) for _cross_entropy_reduce_kernel: "sum" (2)
    the row's loss at [0, row]; "mean" (1) its ce at [0, row] and, with HAS_Z, lse^2 at
    [1, row] (0 where the row does not count). With "none", program 0 also writes COUNTS[2]
    (W with SMOOTH, all the backward reads of COUNTS then; else 0)."""
    row = tl.program_id(0).to(tl.int64)
    base = row * stride_x
    m = tl.full([], -float("inf"), ACC)
    s = tl.full([], -1.0, ACC)
    gaps = tl.full([], 0.0, ACC)
    total_w = tl.full([], 0.0, ACC)
    for start in range(0, classes, TILE):
        cols = start + tl.arange(0, TILE).to(tl.int64)
        valid = cols < classes
        x = tl.load(X_ptr + base + cols, mask=valid, other=-float("inf")).to(ACC)
        m_t, s_t = common.tile_stats(x[None, :], valid[None, :])
        m_t = tl.max(m_t, axis=0)
        s_t = tl.max(s_t, axis=0)
        if SMOOTH:
            if HAS_WEIGHT:
                w = tl.load(W_ptr + cols, mask=valid, other=0.0).to(ACC)
            else:
                w = valid.to(ACC)
            # a -inf logit has an infinite gap (torch's smooth term is then inf)
            d = tl.where(x == -float("inf"), float("inf"), m_t - x)
            gaps_t = tl.sum(tl.where(valid, w * d, 0.0), axis=0)
            w_t = tl.sum(w, axis=0)
            m_new = tl.maximum(m, m_t)
            # Move both sums to the new max; a side already at it moves by nothing (also when
            # both maxima are -inf, where m_new - m would be NaN).
            gaps = gaps + tl.where((total_w > 0) & (m_new != m), (m_new - m) * total_w, 0.0)
            gaps = gaps + gaps_t + tl.where((w_t > 0) & (m_new != m_t), (m_new - m_t) * w_t, 0.0)
            total_w = total_w + w_t
        m, s = common.merge(m, s, m_t, s_t)
    log_rest = common.log1p(s)
    lse = common.finish_lse(m, s)
    tl.store(LSE_ptr + row, lse)
    t, counted = _target(T_ptr, row, stride_t, ignore_index, classes, EPILOGUE)
    x_t = tl.load(X_ptr + base + t).to(ACC)
    nll = ((m - x_t) + log_rest).to(tl.float64)
    if SMOOTH:
        smooth = (gaps + total_w * log_rest).to(tl.float64)
    else:
        smooth = tl.full([], 0.0, tl.float64)
    if EPILOGUE:
        # cross_entropy_rows.h: row_cross_entropy, row_loss and LossTotals.add, in float64
        e = _f64(e_bits)
        ce = ((1.0 - e) * _class_weight(W_ptr, t, counted, HAS_WEIGHT)) * nll
        if SMOOTH:
            ce = ce + (e / tl.cast(classes, tl.int64).to(tl.float64)) * smooth
        finite = _is_finite(lse)
        if REDUCTION == 1:
            tl.store(LOSS_ptr + row, tl.where(counted, tl.where(finite, ce, float("nan")), 0.0))
            if HAS_Z:
                tl.store(LOSS_ptr + rows + row, tl.where(counted, lse * lse, 0.0))
        else:
            if HAS_Z:
                ce = ce + (_f64(z_bits) * lse) * lse
            loss = tl.where(counted, tl.where(finite, ce, float("nan")), 0.0)
            tl.store(LOSS_ptr + row, loss.to(LOSS_ptr.dtype.element_ty))
        if REDUCTION == 0:
            if row == 0:
                _write_counts(
                    T_ptr, W_ptr, COUNTS_ptr, rows, classes, stride_t, ignore_index, HAS_WEIGHT,
                    BLOCK, SMOOTH, ROW_COUNTS=False,
                )  # fmt: skip
    else:
        tl.store(NLL_ptr + row, nll)
        if SMOOTH:
            tl.store(SMOOTH_ptr + row, smooth)


@triton.jit
def _cross_entropy_reduce_kernel(
    PART_ptr,
    T_ptr,
    W_ptr,
    LOSS_ptr,
    COUNTS_ptr,
    rows,
    classes,
    stride_t,
    ignore_index,
    z_bits,
    HAS_WEIGHT: tl.constexpr,
    MEAN: tl.constexpr,
    HAS_Z: tl.constexpr,
    BLOCK: tl.constexpr,
    SMOOTH: tl.constexpr,
):
    """One program: COUNTS (W only with SMOOTH), and the loss "sum" (sum of PART[0]) or "mean"
    (sum PART[0] / counts[0] + z sum PART[1] / counts[1]) of the row kernel's scratch
    PART (2, rows) float64, each lane adding its rows in order, then one tree sum."""
    weight, number = _write_counts(
        T_ptr, W_ptr, COUNTS_ptr, rows, classes, stride_t, ignore_index, HAS_WEIGHT, BLOCK, SMOOTH
    )
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    loss = tl.zeros([BLOCK], tl.float64)
    z = tl.zeros([BLOCK], tl.float64)
    for start in range(0, rows, BLOCK):
        r = start + lanes
        loss += tl.load(PART_ptr + r, mask=r < rows, other=0.0)
        if MEAN and HAS_Z:
            z += tl.load(PART_ptr + rows + r, mask=r < rows, other=0.0)
    total = tl.sum(loss, axis=0)
    if MEAN:
        total = total / weight
        if HAS_Z:
            total = total + (_f64(z_bits) * tl.sum(z, axis=0)) / number
    tl.store(LOSS_ptr, total.to(LOSS_ptr.dtype.element_ty))


def _launch_forward(logits, target, weight, outputs, options, smoothing, code=None, z=False):
    """One launch of _cross_entropy_fwd_kernel over the rows: ``outputs`` are its NLL,
    SMOOTH, LSE, LOSS and COUNTS pointers, ``options`` (ignore_index, the bits of
    label_smoothing and z_loss); ``code`` None for the pieces, else the fused loss's
    reduction."""
    rows, classes = logits.shape
    with common.on_device(logits):
        wrap_triton(_cross_entropy_fwd_kernel)[common.grid(rows)](
            logits,
            target,
            outputs[2] if weight is None else weight,
            *outputs,
            rows,
            classes,
            logits.stride(0),
            target.stride(0),
            *options,
            HAS_WEIGHT=weight is not None,
            SMOOTH=smoothing,
            ACC=common.accumulator(logits.dtype),
            TILE=TILE,
            EPILOGUE=code is not None,
            REDUCTION=code or 0,
            HAS_Z=z,
            BLOCK=REDUCE_BLOCK,
            num_warps=8,
        )


@triton_op("stablekernels::_triton_cross_entropy", mutates_args={})
def forward(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, smoothing: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(nll, smooth, lse) per row, float64; ``smooth`` is 0 unless ``smoothing``."""
    rows, classes = logits.shape
    _check_classes("_triton_cross_entropy", classes)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    nll = torch.empty(rows, dtype=torch.float64, device=logits.device)
    smooth = torch.zeros(rows, dtype=torch.float64, device=logits.device)
    lse = torch.empty(rows, dtype=torch.float64, device=logits.device)
    outputs = (nll, smooth, lse, nll, nll)  # NLL, SMOOTH, LSE; LOSS, COUNTS unused
    _launch_forward(logits, target, weight, outputs, (0, 0, 0), smoothing)
    return nll, smooth, lse


@triton_op("stablekernels::_triton_cross_entropy_loss", mutates_args={})
def cross_entropy_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    reduction: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, lse, counts) of the contract's fused forward: the loss per row ("none") or
    reduced (0-dim), in the accumulation dtype; lse (R,) float64; counts (3,) float64 =
    (sum of counted w_t, counted rows, W), the first two 0 for "none", W 0 without
    label smoothing (no backward reads them then). One launch for "none", two otherwise."""
    op = "_triton_cross_entropy_loss"
    code = _reduction_code(op, reduction)
    rows, classes = logits.shape
    _check_classes(op, classes)
    _check_host_targets(target, ignore_index, classes)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if weight is not None and weight.stride(0) != 1:
        weight = weight.contiguous()
    acc = accumulation_dtype(logits.dtype)
    device = logits.device
    lse = torch.empty(rows, dtype=torch.float64, device=device)
    counts = torch.empty(3, dtype=torch.float64, device=device)
    if code == 0:
        loss = torch.empty(rows, dtype=acc, device=device)
        parts = loss
    else:
        loss = torch.empty((), dtype=acc, device=device)
        parts = torch.empty(
            2 * rows if code == 1 and z_loss != 0 else rows, dtype=torch.float64, device=device
        )
    outputs = (lse, lse, lse, parts, counts)  # NLL, SMOOTH unused; LSE, LOSS, COUNTS
    options = (ignore_index, _f64_bits(label_smoothing), _f64_bits(z_loss))
    _launch_forward(
        logits, target, weight, outputs, options, label_smoothing != 0, code, z_loss != 0
    )
    if code != 0:
        with common.on_device(logits):
            wrap_triton(_cross_entropy_reduce_kernel)[(1,)](
                parts,
                target,
                weight if weight is not None else lse,
                loss,
                counts,
                rows,
                classes,
                target.stride(0),
                ignore_index,
                _f64_bits(z_loss),
                HAS_WEIGHT=weight is not None,
                MEAN=code == 1,
                HAS_Z=z_loss != 0,
                BLOCK=REDUCE_BLOCK,
                SMOOTH=label_smoothing != 0,
                num_warps=4,
            )
    return loss, lse, counts
