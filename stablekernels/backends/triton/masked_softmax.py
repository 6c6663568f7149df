"""Triton masked softmax along the last dim: softmax, log_softmax, the logsumexp or the row
statistics only of ``t = scale * x + mask`` (the kernel ``masked_softmax`` of
stablekernels.backends.Kernels).

For row r of ``x.reshape(-1, n)`` (n = x.shape[-1]) and element j, in the accumulation
dtype (fp32; fp64 for fp64 x):

    t_j = scale * x_j              (x converted first, scale rounded to the accumulation dtype)
        + mask_j                   an additive mask (accumulation dtype), or
        -inf where mask_j is False (a bool mask; True keeps), and
        -inf where j > i + causal_offset, i = r % x.shape[-2] (0 for 1-D x), if causal

then the row state (m, s') of docs/design.md over t (common.tile_stats / merge), and

    lse   = m + log1p(s')  (common.finish_lse, float64)
    SOFTMAX:     y_j = exp(t_j - m) / (1 + s')  (IEEE division)
    LOG_SOFTMAX: y_j = (t_j - m) - log1p(s')
    STATISTICS:  no y
    LOGSUMEXP:   y_r = lse, rounded to ``dtype``

(the modes of stablekernels._masked.MaskedMode). A dropped element has y = 0 (softmax) or
-inf (log_softmax). A dead row (every t_j = -inf: fully masked) has lse = -inf and y = 0 /
-inf throughout (logsumexp -inf), or NaN throughout with masked_rows = MaskedRows.NAN; a
row with a NaN among its t (or +inf as its max) has y NaN throughout, its lse is NaN (+inf
for a +inf max without a NaN, as finish_lse and torch.logsumexp).

The backward: masked_softmax_backward.py.

The mask is read by its strides, broadcast (usually an expanded view with 0 strides, e.g. a
(B, 1, 1, S) key-padding mask expanded to (B, H, S, S)): the launcher coalesces x's leading
dims over the mask's strides into at most MASK_DIMS (size, stride) pairs, and each program
computes its rows' mask offsets from the row index. Nothing of x's or the mask's size is
allocated besides y.

Rows of up to MAX_BLOCK_N elements: one program holds BLOCK_R rows in registers
(common.launch_shape): one read of x and the mask, one write of y; a causal row's loads
stop at its limit (the elements past it are not read). Longer rows: the split path of
softmax.py, SPLIT_CHUNK elements per program: each program folds its chunk's (m, s') tile
by tile, stopping at the row's causal limit (a chunk past it does no work), one program
per row merges the parts (softmax._merge_parts_kernel), a last launch writes the lse, and
the chunks are normalised, tiles past the causal limit written as constants without
reading x or the mask or computing an exp.

Offsets are int64. Every grid is 1-D; launches run on x's device (common.on_device).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..._masked import MaskedMode, MaskedRows
from ..._numerics import accumulation_dtype
from . import common
from .common import MAX_BLOCK_N, SPLIT_CHUNK
from .softmax import _merge_parts_kernel

# The most (size, stride) pairs the leading dims of x coalesce to over the mask's strides.
MASK_DIMS = 4
# MASK_KIND: no mask, a bool mask (True keeps), an additive mask (accumulation dtype).
NO_MASK, BOOL_MASK, ADDITIVE_MASK = 0, 1, 2
# Tile width of the split path's kernels, and the rows per program of its lse launch.
SPLIT_BLOCK_N = 2048
LSE_ROWS = 256


@triton.jit
def _mask_offset(r, d1, d2, d3, ms0, ms1, ms2, ms3):
    """The mask's offset of the rows r (int64): r split over the coalesced leading dims
    (d0, d1, d2, d3), outermost first (d0 implied), times their strides ms0..ms3."""
    i3 = r % d3
    r = r // d3
    i2 = r % d2
    r = r // d2
    i1 = r % d1
    i0 = r // d1
    return i0 * ms0 + i1 * ms1 + i2 * ms2 + i3 * ms3


@triton.jit
def _scores(X_ptr, M_ptr, x_at, m_at, load, scale, MASK_KIND: tl.constexpr, ACC: tl.constexpr):
    """t = scale * x (+ mask, or -inf where a bool mask is False) at the offsets x_at, m_at,
    in ACC; -inf where ``load`` is false (not read: padding, or past a causal limit)."""
    x = tl.load(X_ptr + x_at, mask=load, other=0.0).to(ACC)
    t = scale * x
    if MASK_KIND == 1:
        keep = tl.load(M_ptr + m_at, mask=load, other=0) != 0
        t = tl.where(keep, t, -float("inf"))
    elif MASK_KIND == 2:
        t = t + tl.load(M_ptr + m_at, mask=load, other=0.0).to(ACC)
    return tl.where(load, t, -float("inf"))


@triton.jit
def _normalised(t, m, s, LOG: tl.constexpr, ACC: tl.constexpr, NAN_ROWS: tl.constexpr):
    """softmax (log_softmax if LOG) of scores t of rows with states (m, s') (broadcast to t):
    the formula where m is finite and s' not NaN; 0 / -inf throughout a dead row (m = -inf),
    NaN if NAN_ROWS; NaN throughout a row with a NaN or a +inf max."""
    if LOG:
        y = (t - m) - common.log1p(s)
        fill = -float("inf")
    else:
        y = common.divide(tl.exp(t - m), 1.0 + s, ACC)
        fill = 0.0
    if NAN_ROWS:
        fill = float("nan")
    no_nan = s == s
    ok = no_nan & (m == m) & (tl.abs(m) != float("inf"))
    dead = no_nan & (m == -float("inf"))
    return tl.where(ok, y, tl.where(dead, fill, float("nan")))


@triton.jit
def _store_logsumexp(OUT_ptr, r, lse, valid, NAN_ROWS: tl.constexpr):
    """The LOGSUMEXP mode's output: the float64 lse rounded to OUT's dtype, NaN on a dead
    row (lse -inf) if NAN_ROWS."""
    if NAN_ROWS:
        lse = tl.where(lse == -float("inf"), float("nan"), lse)
    tl.store(OUT_ptr + r, lse.to(OUT_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _masked_softmax_kernel(
    X_ptr,
    M_ptr,
    Y_ptr,
    LSE_ptr,
    rows,
    n,
    rows_q,
    causal_offset,
    scale: tl.float64,
    d1,
    d2,
    d3,
    ms0,
    ms1,
    ms2,
    ms3,
    msn,
    MASK_KIND: tl.constexpr,
    CAUSAL: tl.constexpr,
    MODE: tl.constexpr,
    NAN_ROWS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """BLOCK_R whole rows (n <= BLOCK_N) per program: lse, and y by MODE (MaskedMode: 0
    softmax, 1 log_softmax, 2 none, 3 the logsumexp)."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_N).to(tl.int64)
    in_tile = (r < rows)[:, None] & (cols < n)[None, :]
    load = in_tile
    if CAUSAL:
        limit = r % rows_q + causal_offset
        load = load & (cols[None, :] <= limit[:, None])
    m_at = _mask_offset(r, d1, d2, d3, ms0, ms1, ms2, ms3)[:, None] + cols[None, :] * msn
    x_at = (r * n)[:, None] + cols[None, :]
    t = _scores(X_ptr, M_ptr, x_at, m_at, load, tl.full([], scale, ACC), MASK_KIND, ACC)
    m, s = common.tile_stats(t, load)
    lse = common.finish_lse(m, s)
    tl.store(LSE_ptr + r, lse, mask=r < rows)
    if MODE == 3:
        _store_logsumexp(Y_ptr, r, lse, r < rows, NAN_ROWS)
    elif MODE != 2:
        y = _normalised(t, m[:, None], s[:, None], MODE == 1, ACC, NAN_ROWS)
        tl.store(Y_ptr + x_at, y.to(Y_ptr.dtype.element_ty), mask=in_tile)


@triton.jit
def _chunk_bounds(program, parts, n, rows_q, causal_offset, CAUSAL: tl.constexpr, CHUNK):
    """(row, begin, end, kept_end) of chunk `part` of row `row` (program row * parts +
    part): the chunk is [begin, end), its elements to read [begin, kept_end) (kept_end <
    begin where the causal limit lies before the chunk)."""
    row, part = program // parts, program % parts
    begin = part * CHUNK
    end = tl.minimum(begin + CHUNK, n)
    kept_end = end
    if CAUSAL:
        kept_end = tl.minimum(end, row % rows_q + causal_offset + 1)
    return row, begin, end, kept_end


@triton.jit
def _masked_parts_kernel(
    X_ptr,
    M_ptr,
    PART_M_ptr,
    PART_S_ptr,
    n,
    rows_q,
    causal_offset,
    scale: tl.float64,
    d1,
    d2,
    d3,
    ms0,
    ms1,
    ms2,
    ms3,
    msn,
    parts,
    MASK_KIND: tl.constexpr,
    CAUSAL: tl.constexpr,
    ACC: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """(m, s') of the scores of one chunk of one row, folded tile by tile up to the row's
    causal limit, into the part workspace ((-inf, -1), the empty state, past it)."""
    program = tl.program_id(0).to(tl.int64)
    row, begin, end, kept_end = _chunk_bounds(
        program, parts, n, rows_q, causal_offset, CAUSAL, CHUNK
    )
    x_base = row * n
    m_base = _mask_offset(row, d1, d2, d3, ms0, ms1, ms2, ms3)
    scale_acc = tl.full([], scale, ACC)
    m_run = tl.full([], -float("inf"), ACC)
    s_run = tl.full([], -1.0, ACC)
    for start in range(begin, kept_end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
        load = cols < kept_end
        t = _scores(
            X_ptr, M_ptr, x_base + cols, m_base + cols * msn, load, scale_acc, MASK_KIND, ACC
        )
        m_t, s_t = common.tile_stats(t[None, :], load[None, :])  # one row: shape [1]
        m_run, s_run = common.merge(m_run, s_run, tl.max(m_t, axis=0), tl.max(s_t, axis=0))
    tl.store(PART_M_ptr + program, m_run)
    tl.store(PART_S_ptr + program, s_run)


@triton.jit
def _masked_lse_kernel(
    ROW_M_ptr,
    ROW_S_ptr,
    LSE_ptr,
    OUT_ptr,
    rows,
    LOGSUMEXP: tl.constexpr,
    NAN_ROWS: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """The float64 lse of BLOCK_R rows' merged (m, s'), and with LOGSUMEXP the mode's
    output."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    m = tl.load(ROW_M_ptr + r, mask=r < rows, other=0.0)
    s = tl.load(ROW_S_ptr + r, mask=r < rows, other=0.0)
    lse = common.finish_lse(m, s)
    tl.store(LSE_ptr + r, lse, mask=r < rows)
    if LOGSUMEXP:
        _store_logsumexp(OUT_ptr, r, lse, r < rows, NAN_ROWS)


@triton.jit
def _masked_softmax_finish_kernel(
    X_ptr,
    M_ptr,
    Y_ptr,
    ROW_M_ptr,
    ROW_S_ptr,
    n,
    rows_q,
    causal_offset,
    scale: tl.float64,
    d1,
    d2,
    d3,
    ms0,
    ms1,
    ms2,
    ms3,
    msn,
    parts,
    MASK_KIND: tl.constexpr,
    CAUSAL: tl.constexpr,
    LOG: tl.constexpr,
    NAN_ROWS: tl.constexpr,
    ACC: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """y of one chunk of one row from the row's merged (m, s'): tiles up to the causal limit
    read x and the mask; the tiles after it are the row's constant (0 / -inf, NaN for a NaN
    row), written without a read or an exp."""
    program = tl.program_id(0).to(tl.int64)
    row, begin, end, kept_end = _chunk_bounds(
        program, parts, n, rows_q, causal_offset, CAUSAL, CHUNK
    )
    m = tl.load(ROW_M_ptr + row)
    s = tl.load(ROW_S_ptr + row)
    x_base = row * n
    m_base = _mask_offset(row, d1, d2, d3, ms0, ms1, ms2, ms3)
    scale_acc = tl.full([], scale, ACC)
    for start in range(begin, kept_end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
        load = cols < kept_end
        t = _scores(
            X_ptr, M_ptr, x_base + cols, m_base + cols * msn, load, scale_acc, MASK_KIND, ACC
        )
        y = _normalised(t, m, s, LOG, ACC, NAN_ROWS)
        tl.store(Y_ptr + x_base + cols, y.to(Y_ptr.dtype.element_ty), mask=cols < end)
    if CAUSAL:
        # The first tile wholly past the limit (the loop above wrote the one it falls in).
        tail = begin + tl.cdiv(tl.maximum(kept_end - begin, 0), BLOCK_N) * BLOCK_N
        past = _normalised(tl.full([BLOCK_N], -float("inf"), ACC), m, s, LOG, ACC, NAN_ROWS)
        past = past.to(Y_ptr.dtype.element_ty)
        for start in range(tail, end, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
            tl.store(Y_ptr + x_base + cols, past, mask=cols < end)


def mask_layout(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[int, ...]:
    """(d1, d2, d3, ms0, ms1, ms2, ms3, msn): x's leading dims (all but the last) as at most
    MASK_DIMS coalesced dims (d0, d1, d2, d3), outermost first (d0 is implied by the row
    count), with the mask's strides over them (ms0..ms3) and along the row (msn); all 1 / 0
    without a mask. Dims of size 1 are dropped, and an outer dim merges into the inner one
    next to it where its stride is the inner's size times the inner's stride (a contiguous
    run, or a run of broadcast 0 strides). ValueError beyond MASK_DIMS dims."""
    if mask is None:
        return (1, 1, 1, 0, 0, 0, 0, 0)
    dims: list[tuple[int, int]] = []
    for size, stride in zip(x.shape[:-1], mask.stride()[:-1], strict=True):
        if size == 1:
            continue
        if dims and dims[-1][1] == stride * size:
            dims[-1] = (dims[-1][0] * size, stride)
        else:
            dims.append((size, stride))
    if len(dims) > MASK_DIMS:
        raise ValueError(
            f"stablekernels (triton) masked_softmax: the mask's strides {tuple(mask.stride())} "
            f"over x's shape {tuple(x.shape)} leave {len(dims)} leading dims that do not "
            f"coalesce; at most {MASK_DIMS} are supported (make the mask contiguous, or "
            "expand it from fewer dims)"
        )
    dims = [(1, 0)] * (MASK_DIMS - len(dims)) + dims
    sizes = [size for size, _ in dims]
    strides = [stride for _, stride in dims]
    return (*sizes[1:], *strides, mask.stride(-1))


@triton_op("stablekernels::_triton_masked_softmax", mutates_args={})
def masked_softmax(
    x: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    causal_offset: int | None,
    dtype: torch.dtype,
    mode: int,
    masked_rows: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The masked_softmax kernel of the contract (stablekernels.backends.Kernels).

    x: contiguous, floating, >= 1-D, non-empty; rows along the last dim. mask: None, or x's
    shape with any strides (read by them, never copied), bool (True keeps) or the
    accumulation dtype (additive). scale: multiplies x in the accumulation dtype.
    causal_offset: None, or drop j > i + causal_offset (i = row % x.shape[-2]). mode (a
    MaskedMode): 0 softmax, 1 log_softmax, 2 statistics only, 3 the logsumexp. masked_rows
    (a MaskedRows; 0, "zero", by default): 1 makes a dead row's y NaN.

    Returns (y, lse): y of ``dtype``, contiguous, of x's shape (softmax, log_softmax),
    (0,) (statistics) or (rows,) (logsumexp), and lse float64 of shape (rows,), rows =
    x.numel() // x.shape[-1].
    """
    assert x.dim() >= 1 and x.numel() > 0 and x.is_floating_point() and x.is_contiguous()
    mode = MaskedMode(mode)
    nan_rows = MaskedRows(masked_rows) == MaskedRows.NAN
    acc_dtype = accumulation_dtype(x.dtype, dtype)
    if mask is None:
        kind = NO_MASK
    else:
        assert mask.shape == x.shape and mask.device == x.device, (mask.shape, x.shape)
        assert mask.dtype in (torch.bool, acc_dtype), (mask.dtype, acc_dtype)
        kind = BOOL_MASK if mask.dtype == torch.bool else ADDITIVE_MASK
    n = x.shape[-1]
    rows = x.numel() // n
    rows_q = x.shape[-2] if x.dim() >= 2 else 1
    causal = causal_offset is not None
    offset = causal_offset if causal else 0
    # An offset past the row (either way) drops the same elements as one at the row's edge,
    # and keeps the kernels' integer arithmetic in range.
    offset = max(-n - 1, min(offset, n))
    layout = mask_layout(x, mask)
    lse = torch.empty(rows, dtype=torch.float64, device=x.device)
    shape = {MaskedMode.STATISTICS: (0,), MaskedMode.LOGSUMEXP: (rows,)}.get(mode, x.shape)
    y = torch.empty(shape, dtype=dtype, device=x.device)
    m_arg = x if mask is None else mask  # never read without a mask
    acc = common.accumulator(x.dtype, dtype)
    scale = float(scale)
    with common.on_device(x):
        if n <= MAX_BLOCK_N:
            block_r, block_n, warps = common.launch_shape(n)
            wrap_triton(_masked_softmax_kernel)[common.grid(triton.cdiv(rows, block_r))](
                x,
                m_arg,
                y,
                lse,
                rows,
                n,
                rows_q,
                offset,
                scale,
                *layout,
                MASK_KIND=kind,
                CAUSAL=causal,
                MODE=int(mode),
                NAN_ROWS=nan_rows,
                ACC=acc,
                BLOCK_R=block_r,
                BLOCK_N=block_n,
                num_warps=warps,
            )
            return y, lse
        parts = triton.cdiv(n, SPLIT_CHUNK)
        part_m = torch.empty(rows * parts, dtype=acc_dtype, device=x.device)
        part_s = torch.empty(rows * parts, dtype=acc_dtype, device=x.device)
        wrap_triton(_masked_parts_kernel)[common.grid(rows * parts)](
            x,
            m_arg,
            part_m,
            part_s,
            n,
            rows_q,
            offset,
            scale,
            *layout,
            parts,
            MASK_KIND=kind,
            CAUSAL=causal,
            ACC=acc,
            CHUNK=SPLIT_CHUNK,
            BLOCK_N=SPLIT_BLOCK_N,
            num_warps=8,
        )
        row_m = torch.empty(rows, dtype=acc_dtype, device=x.device)
        row_s = torch.empty(rows, dtype=acc_dtype, device=x.device)
        wrap_triton(_merge_parts_kernel)[common.grid(rows)](
            part_m, part_s, row_m, row_s, parts, BLOCK=common.PARTS_BLOCK, num_warps=4
        )
        wrap_triton(_masked_lse_kernel)[common.grid(triton.cdiv(rows, LSE_ROWS))](
            row_m,
            row_s,
            lse,
            y,
            rows,
            LOGSUMEXP=mode == MaskedMode.LOGSUMEXP,
            NAN_ROWS=nan_rows,
            BLOCK_R=LSE_ROWS,
            num_warps=4,
        )
        if mode in (MaskedMode.SOFTMAX, MaskedMode.LOG_SOFTMAX):
            wrap_triton(_masked_softmax_finish_kernel)[common.grid(rows * parts)](
                x,
                m_arg,
                y,
                row_m,
                row_s,
                n,
                rows_q,
                offset,
                scale,
                *layout,
                parts,
                MASK_KIND=kind,
                CAUSAL=causal,
                LOG=mode == MaskedMode.LOG_SOFTMAX,
                NAN_ROWS=nan_rows,
                ACC=acc,
                CHUNK=SPLIT_CHUNK,
                BLOCK_N=SPLIT_BLOCK_N,
                num_warps=8,
            )
    return y, lse
