"""Shared pieces of the Triton kernels: the row view of a tensor, launch heuristics, and the
(m, s') math of docs/design.md written as Triton functions (the Triton twin of
stablekernels/_numerics.py, whose accumulation-dtype rule it uses).

Rows: a tensor reduced along ``dim`` is viewed as ``(outer, n, inner)``; row r is
(o, i) = (r // inner, r % inner) and its element j is at ``o * stride_o + j * stride_n +
i * stride_i``. Outputs are contiguous, so in them the same element is at
``o * n * inner + j * inner + i``. Row ids and offsets are int64 (cast before multiplying
by strides), so tensors past 2**31 elements address correctly.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from ..._numerics import accumulation_dtype

# The widest row one program holds in registers: longer rows take the split path (several
# programs per row, their (m, s') merged, then a normalising pass).
MAX_BLOCK_N = 8192
# Elements per program on the split path.
SPLIT_CHUNK = 8192
# Part states one program of the split path's merge reads at a time.
PARTS_BLOCK = 1024
# CUDA's limit on a grid's x dimension; every launcher puts all its programs there.
MAX_PROGRAMS = 2**31 - 1


def on_device(t: torch.Tensor):
    """The launch context of a kernel on ``t``: ``t``'s CUDA device made current, so that
    Triton (which launches on the current device and its current stream) runs on the
    tensor's device, ordered after the work queued there (a tensor on cuda:1 while cuda:0 is
    current). A no-op for CPU tensors (the interpreter)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def grid(programs: int) -> tuple[int]:
    """A 1-D grid of ``programs``; RuntimeError where that passes CUDA's limit of 2**31 - 1
    (only for tensors of 2**31 rows or more)."""
    if programs > MAX_PROGRAMS:
        raise RuntimeError(
            f"stablekernels (triton): {programs} programs exceed CUDA's grid limit of "
            f"{MAX_PROGRAMS}; use the cuda backend for this tensor"
        )
    return (programs,)


def rows_view(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``t`` as a 3-D (outer, n, inner) view along ``dim``, copied to contiguous only when
    its strides do not allow the view (expanded or oddly sliced inputs)."""
    n = t.shape[dim]
    outer = math.prod(t.shape[:dim])
    inner = math.prod(t.shape[dim + 1 :])
    try:
        return t.view(outer, n, inner)
    except RuntimeError:
        return t.contiguous().view(outer, n, inner)


def accumulator(*dtypes: torch.dtype):
    """The accumulation dtype of :func:`stablekernels._numerics.accumulation_dtype` as a
    Triton dtype."""
    return tl.float64 if accumulation_dtype(*dtypes) == torch.float64 else tl.float32


def launch_shape(n: int) -> tuple[int, int, int]:
    """(BLOCK_R rows per program, BLOCK_N columns, num_warps) for rows of n <= MAX_BLOCK_N:
    short rows go several to a program so that a program still moves a few thousand
    elements."""
    block_n = max(16, triton.next_power_of_2(n))
    block_r = max(1, min(64, 4096 // block_n))
    num_warps = 4 if block_n * block_r <= 4096 else (8 if block_n <= 4096 else 16)
    return block_r, block_n, num_warps


@triton.jit
def log1p(s):
    """log(1 + s) accurate for tiny s: log(u) * s / (u - 1) with u = 1 + s rounded, which
    cancels the rounding of u (Goldberg 1991); s itself where u rounds to 1."""
    u = 1.0 + s
    d = u - 1.0
    return tl.where(d == 0.0, s, tl.log(u) * (s / d))


@triton.jit
def tile_stats(x, valid):
    """(m, s') of each row of a 2-D tile (rows along axis 0; ``valid`` masks the padding).

    s' sums exp(x - m) over the elements != m, plus (ties - 1): one max term left out, no
    cancellation. Elements equal to m are counted, not exponentiated: exp(m - m) is NaN for
    an infinite m. A NaN makes s' NaN.
    """
    m = tl.max(x, axis=1)
    is_max = (x == m[:, None]) & valid
    e = tl.exp(x - m[:, None])
    rest = tl.sum(tl.where(is_max | (valid == 0), 0.0, e), axis=1)
    ties = tl.sum(is_max.to(x.dtype), axis=1)
    return m, rest + (ties - 1.0)


@triton.jit
def merge(m1, s1, m2, s2):
    """(m1, s1') + (m2, s2') by the merge rule of docs/design.md; equal maxima (also -inf == -inf)
    merge exactly as s1' + s2' + 1, and a NaN anywhere makes s' NaN."""
    first = m1 >= m2
    m_hi = tl.where(first, m1, m2)
    s_hi = tl.where(first, s1, s2)
    m_lo = tl.where(first, m2, m1)
    s_lo = tl.where(first, s2, s1)
    s = tl.where(m1 == m2, s1 + s2 + 1.0, s_hi + (s_lo + 1.0) * tl.exp(m_lo - m_hi))
    return m_hi, s


@triton.jit
def merge_parts(ms, ss, k):
    """Merge a vector of part states (ms, ss) at part indices k (padding: -inf, -1) into one
    (m, s'): the first part holding the max contributes s', every other part
    (s' + 1) * exp(m_k - m), exactly (s' + 1) when m_k == m."""
    m = tl.max(ms, axis=0)
    top = tl.min(tl.where(ms == m, k, 2147483647), axis=0)
    terms = tl.where(k == top, ss, tl.where(ms == m, ss + 1.0, (ss + 1.0) * tl.exp(ms - m)))
    return m, tl.sum(terms, axis=0)


@triton.jit
def divide(a, b, ACC: tl.constexpr):
    """a / b with IEEE round-to-nearest (Triton's fp32 ``/`` may be approximate)."""
    if ACC == tl.float64:
        return a / b
    else:
        return tl.div_rn(a, b)


@triton.jit
def nan_unless_finite(value, m):
    """torch's softmax and log_softmax are NaN on a whole row with a +inf, a NaN or nothing
    but -inf, i.e. wherever the row max is not finite."""
    return tl.where((m == m) & (tl.abs(m) != float("inf")), value, float("nan"))


@triton.jit
def finish_lse(m, s):
    """The float64 logsumexp of row states (m, s'), as _numerics.finish_lse: m + log1p(s'),
    the max itself where it is infinite (-inf for all -inf, +inf for a +inf), NaN where s'
    is NaN (a NaN in the row)."""
    m64 = m.to(tl.float64)
    lse = tl.where(tl.abs(m) == float("inf"), m64, m64 + log1p(s).to(tl.float64))
    return tl.where(s != s, float("nan"), lse)


@triton.jit
def split_lse(lse, ACC: tl.constexpr):
    """A float64 lse as hi + lo in ACC, so that x - lse is taken as (x - hi) - lo with x - hi
    exact near the lse (online_softmax.h:split_lse; _numerics.split_lse); lo is 0 where lse
    is not finite."""
    hi = lse.to(ACC)
    finite = (lse == lse) & (lse != float("inf")) & (lse != float("-inf"))
    lo = tl.where(finite, (lse - hi.to(tl.float64)).to(ACC), 0.0)
    return hi, lo
