"""Error bounds derived from the floating-point arithmetic, for checks that hold on any CPU.

A bound fitted on one machine (``4 * eps * max|ref|``) measures that machine's BLAS: its
blocking, hence its summation order and rounding, differs by CPU, capability (AVX2,
AVX-512), library and thread count. The bounds here hold for *any* order instead.

The basic fact (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., Lemma 3.1
and eq. (3.5)): a float32 sum of k + 1 terms, or a dot product of length k, computed in any
order, blocked or not, with or without fused multiply-adds, errs by at most
``gamma_k * sum_i |a_i b_i|``, ``gamma_k = k u / (1 - k u)``, u = 2^-24. So ``A @ B`` errs
elementwise by at most ``gamma_K * (|A| @ |B|)`` (:func:`matmul_bound`). Elementwise
operations round once each (u relative); exp, log1p and tanh are allowed 4 ulp.

:func:`linear_cross_entropy_bounds` carries these through the linear cross-entropy
(stablekernels._linear_tiles and the class-probability path of
stablekernels._linear_cross_entropy): the logits' matmul, the temperature and softcap, the
log-sum-exp, the softmax, the per-element arithmetic of dz, and the backward's matmuls.
No step drops second-order terms: where an error feeds a later step, that step is taken at
its worst point (|y| + e for |y|, exp(d) - 1 for an exponent off by d).
Each bound is in float64 and elementwise; :func:`assert_within` checks
``|actual - ref| <= bound`` and that the same check fails on a perturbed ``actual``.
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch

U = 2.0**-24
"""The unit roundoff of float32, the accumulation dtype of half and float32 inputs: a float32
operation returns the exact result of its operands times (1 + d), |d| <= U."""

FUNCTION_ERROR = 8 * U
"""exp and log1p within 4 ulp, 8 U relative (tanh: 8 U absolute, its values in [-1, 1]). The
libraries in use do better: Sleef's u10 functions (ATen's AVX2 and AVX-512 kernels) 1 ulp,
glibc (ATen's default capability) under 2 ulp, the extension's exp_fp32 2.5 ulp (measured by
csrc/tests/test_cpu_kernels.cpp), numpy's float32 exp (the Triton interpreter) under 3 ulp,
the Triton kernels' tanh "a few ulps" from exp and log."""

RESCALE_BLOCK = 32
"""A running float32 sum of exp(z_j - m) is moved to a new max at most once per this many
classes (the fused Triton forward folds tiles of 64 classes for float32, 128 for halves;
the Triton cross-entropy kernel 2048; the torch backend and the extension sum a tile in
float32 without moving it, and merge tiles or chunks in float64)."""

FLUSH = 2.0**-125
"""exp results below it may come back as 0 (the extension's exp_fp32 flushes them): an
absolute error of at most 2 FLUSH, the exponent being off by under log 2 here."""

REFERENCE_SLACK = 1 + 2.0**-20
"""The float64 reference, and the float64 evaluation of these bounds, err by the same
formulas with 2^-53 in place of U: under 2^-28 of the bound. Bounds are scaled by this."""


def gamma(k: int, u: float = U) -> float:
    """Higham's gamma_k = k u / (1 - k u): the relative error bound of k roundings in a row,
    and of a sum of k + 1 terms (a dot product of length k) in any order."""
    assert k * u < 1
    return k * u / (1 - k * u)


def matmul_bound(a: torch.Tensor, b: torch.Tensor, more: int = 0) -> torch.Tensor:
    """Elementwise bound on |fl32(a @ b) - a @ b| for float32 operands (or halves converted to
    float32), whatever order the BLAS sums in: gamma_{K + more} (|a| @ |b|), K = a.shape[-1]
    (``more``: roundings after it, such as a bias added or a scale applied)."""
    a, b = a.detach().double().abs(), b.detach().double().abs()
    return gamma(a.shape[-1] + more) * (a @ b)


def rounded(bound: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The bound after the float32 result (within ``bound`` of ``ref``) is rounded to
    ``dtype``: plus eps/2 of its magnitude, plus half the spacing of the subnormals (fp16's
    2^-25); nothing for float32, which is the computation's own dtype."""
    if dtype == torch.float32:
        return bound
    info = torch.finfo(dtype)
    return bound + info.eps / 2 * (ref.abs() + bound) + info.tiny * info.eps / 2


@dataclasses.dataclass
class Bounds:
    """Elementwise bounds (float64) and the float64 values they are bounds around."""

    loss: torch.Tensor
    grads: tuple  # (dx, dW, db or None)
    ref_loss: torch.Tensor
    ref_grads: tuple


def linear_cross_entropy_bounds(
    x, w, b, target, grad, *, weight=None, label_smoothing=0.0, temperature=1.0, softcap=None,
    reduction="none", ignore_index=-100, loss_dtype=None,
) -> Bounds:  # fmt: skip
    """Bounds on the errors of sk.linear_cross_entropy (any backend, the fused forward or the
    tiles, a gradient made in the forward or in the backward) against its exact value on the
    given inputs, for float32 accumulation (inputs float32, float16 or bfloat16; z_loss 0).

    ``target``: class indices (rows,) or probabilities (rows, V); ``grad``: the gradient of
    the loss the op receives ((rows,) for "none", a scalar otherwise). The loss bound is for
    ``loss_dtype`` (default x's dtype), the gradients' for the dtypes of x, w and b.

    With e_* an error bound, u = 2^-24, f = 8u (:data:`FUNCTION_ERROR`), per row of V
    classes (R = ceil(V / 32) - 1 rescalings of a float32 running sum, B = R + 1 blocks):

    logits   y = x W^T + b:   e_y = gamma_{H+1} (|x| |W|^T + |b|)
             / T:             e_t = (e_y + 2u (|y| + e_y)) / T   (T rounded, the quotient)
             c tanh(t / c):   e_tanh = max sech^2 within the argument's error
                                       x (e_t + 2u (|t| + e_t)) / c + f,
                              e_z = c e_tanh + 2u c              (c rounded, the product)
    lse      L = m + log1p(s'), m the max (lse is 1-Lipschitz in the max norm):
             e_L = max_j e_z - log(1 - rho) + f (L - m + 2 max_j e_z + rho), where rho, the
             relative error of 1 + s', = (1 + gamma_{V+2B}) (1 + e^{2 max e_z} sum_j p_j t_j
             + V 2^-125) - 1, t_j = 2u (m - z_j + 2 max e_z) + f + R (f + 2u) (z_j - m and
             the rescalings' exponents rounded, exp, each rescaling's exp, product and sum)
    softmax  p_j = exp((z_j - hi) - lo) (or of log_softmax): relative error
             r_j = e^{d_j} (1 + f) - 1, d_j = e_z_j + e_L + 3u (L - z_j + e_z_j + e_L) + u^2 |L|
    dz       g (A p_j - a_j), a_j the weighted, smoothed one-hot (or probabilities), A their
             sum: e = |g| (A p ((1 + r)(1 + gamma_{V+4}) (1 + 2u) - 1) + 6u a_j + 2 A 2^-125)
             (A a float32 sum of V terms at worst, 4 roundings of A, g and the product, 4 of
             a_j, 2 subtractions; exp may flush below 2^-125)
    chain    dz' = dz S / T, S = 1 - tanh^2 (1 without softcap), e_S = (2 |tanh| + e_tanh)
             e_tanh + 3u: e' = (e S+ + |dz| e_S) / T + k u (|dz| + e) S+ / T, S+ = S + e_S,
             k = 5 with softcap (c and 1 / c rounded, three products) + 2 with T
    dx       e' @ |W| + gamma_{V+2} (|dz'| + e') @ |W|       (+2: a reduction's scale)
    dW       e'^T @ |x| + gamma_{N+2} (|dz'| + e')^T @ |x|   (N rows, all chunks)
    db       sum_rows e' + gamma_{N+2} sum_rows (|dz'| + e')
    loss     sum_j a_j (e_L + e_z_j) + gamma_{V+2B+6} sum_j a_j (L - z_j + e_z_j + e_L) per
             row, every term >= 0 (the gaps m - z_j, their weights, log1p(s'), the moves of
             the gaps to a new max, the sums); "sum" and "mean" add gamma_N sum_rows |loss|
             (a float32 sum), "mean" divides by the count and adds u |loss| (gamma_N more
             with class weights: their float32 sum)

    then each result's rounding to its dtype (:func:`rounded`); all times
    :data:`REFERENCE_SLACK`.
    """
    dtypes = {x.dtype, w.dtype} | ({b.dtype} if b is not None else set())
    assert torch.float64 not in dtypes, "float32 accumulation only"
    x64, w64 = x.detach().double(), w.detach().double()
    b64 = None if b is None else b.detach().double()
    rows, hidden = x64.shape
    vocab = w64.shape[0]
    u, f = U, FUNCTION_ERROR

    # logits: the matmul (the bias its initial value or added after: H + 1 terms)
    y = x64 @ w64.t()
    e = matmul_bound(x64, w64.t(), more=b is not None)
    if b64 is not None:
        y, e = y + b64, e + gamma(hidden + 1) * b64.abs()
    ops = 0  # roundings of the chain rule's products and quotients
    temperature = float(temperature)
    if temperature != 1.0:
        y, e = y / temperature, (e + 2 * u * (y.abs() + e)) / temperature
        ops += 2
    if softcap is not None:
        c = float(softcap)
        a, da = y / c, (e + 2 * u * (y.abs() + e)) / c
        tanh = torch.tanh(a)
        sech2 = 1 - torch.tanh((a.abs() - da).clamp(min=0)) ** 2  # the largest within da of a
        e_tanh = sech2 * da + f
        z, e = c * tanh, c * e_tanh + 2 * u * c
        slope, e_slope = 1 - tanh**2, (2 * tanh.abs() + e_tanh) * e_tanh + 3 * u
        ops += 5
    else:
        z, slope, e_slope = y, torch.ones_like(y), torch.zeros_like(y)

    # log-sum-exp: the logits' error (lse is 1-Lipschitz in the max norm) and its own rounding
    lse = torch.logsumexp(z, 1, keepdim=True)
    m = z.amax(1, keepdim=True)
    p = torch.exp(z - lse)
    ez = e.amax(1, keepdim=True)
    rescales = max(math.ceil(vocab / RESCALE_BLOCK) - 1, 0)
    per_term = 2 * u * (m - z + 2 * ez) + f + rescales * (f + 2 * u)
    rho = (1 + gamma(vocab + 2 * (rescales + 1))) * (
        1 + torch.exp(2 * ez) * (p * per_term).sum(1, keepdim=True) + vocab * FLUSH
    ) - 1
    e_lse = ez - torch.log1p(-rho) + f * (lse - m + 2 * ez + rho)

    # the loss's coefficients: loss_i = sum_j a_ij (L_i - z_ij)
    class_weight = (
        torch.ones(vocab, dtype=torch.float64) if weight is None else weight.detach().double()
    )
    smoothing = float(label_smoothing)
    if target.dim() == 1:
        counted = target != ignore_index
        safe = torch.where(counted, target, 0)
        coef = torch.zeros(rows, vocab, dtype=torch.float64)
        coef.scatter_(1, safe[:, None], ((1 - smoothing) * class_weight[safe])[:, None])
        coef = (coef + smoothing / vocab * class_weight) * counted[:, None]
        denominator = (class_weight[safe] * counted).sum()
    else:
        q = target.detach().double()
        coef = class_weight * (q * (1 - smoothing) + smoothing / vocab)
        counted = torch.ones(rows, dtype=torch.bool)
        denominator = torch.tensor(float(rows), dtype=torch.float64)
    total = coef.sum(1, keepdim=True)

    per_row = (coef * (lse - z)).sum(1)
    e_row = (coef * (e_lse + e)).sum(1) + gamma(vocab + 2 * (rescales + 1) + 6) * (
        coef * (lse - z + e + e_lse)
    ).sum(1)
    grad = grad.detach().double()
    if reduction == "none":
        loss, e_loss, g = per_row, e_row, grad.reshape(rows)
    else:
        loss = per_row.sum()
        e_loss = e_row.sum() + gamma(rows) * per_row.abs().sum()
        g = grad.expand(rows)
        if reduction == "mean":
            loss, e_loss, g = loss / denominator, e_loss / denominator, g / denominator
            e_loss = e_loss + (u + (gamma(rows) if weight is not None else 0)) * (
                loss.abs() + e_loss
            )
    g = torch.where(counted, g, 0.0)[:, None]

    # dz along the logits: g (A p_j - a_j), then the chain through softcap and temperature
    delta = e + e_lse + 3 * u * (lse - z + e + e_lse) + u * u * lse.abs()
    r = torch.exp(delta) * (1 + f) - 1
    big = 1 + gamma(vocab + 4)
    dz = g * (total * p - coef)
    e_dz = g.abs() * (
        total * p * ((1 + r) * big * (1 + 2 * u) - 1) + 6 * u * coef + 2 * total * FLUSH
    )
    dz, e_dz = (
        dz * slope / temperature,
        (e_dz * (slope + e_slope) + dz.abs() * e_slope) / temperature
        + ops * u * (dz.abs() + e_dz) * (slope + e_slope) / temperature,
    )
    size = dz.abs() + e_dz

    ref_grads = (dz @ w64, dz.t() @ x64, None if b is None else dz.sum(0))
    grads = (
        e_dz @ w64.abs() + matmul_bound(size, w64, more=2),
        e_dz.t() @ x64.abs() + matmul_bound(size.t(), x64, more=2),
        None if b is None else e_dz.sum(0) + gamma(rows + 2) * size.sum(0),
    )
    grads = tuple(
        None if bound is None else REFERENCE_SLACK * rounded(bound, ref, t.dtype)
        for bound, ref, t in zip(grads, ref_grads, (x, w, b), strict=True)
    )
    loss_dtype = x.dtype if loss_dtype is None else loss_dtype
    e_loss = REFERENCE_SLACK * rounded(e_loss, loss, loss_dtype)
    return Bounds(e_loss, grads, loss, ref_grads)


def error_ratio(actual: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor) -> float:
    """max |actual - ref| / bound, elementwise in float64 (0 / 0 counts 0): <= 1 is within."""
    err = (actual.detach().double() - ref.detach().double()).abs()
    ratio = torch.where(err == 0, 0.0, err / bound)
    return ratio.max().item() if ratio.numel() else 0.0


def assert_within(actual, ref, bound, name: str = "", perturbation: float = 1e-3) -> float:
    """|actual - ref| <= bound elementwise, and the check is not vacuous: ``actual`` scaled
    by 1 + max(perturbation, 4 eps of its dtype) (a wrong answer off by that much; below 4
    eps a half result could not tell) fails it. Returns the worst error-to-bound ratio.

    With STABLEKERNELS_BOUND_LOG set to a file, appends ``test, name, ratio, perturbed
    ratio`` to it (tab-separated), for a survey of the margins."""
    ratio = error_ratio(actual, ref, bound)
    scale = 1 + max(perturbation, 4 * torch.finfo(actual.dtype).eps)
    perturbed = error_ratio(actual.detach().double() * scale, ref, bound)
    log = os.environ.get("STABLEKERNELS_BOUND_LOG")
    if log:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        with open(log, "a") as out:
            out.write(f"{test}\t{name}\t{ratio:.6g}\t{perturbed:.6g}\n")
    assert ratio <= 1, f"{name}: error {ratio:.3g} x its derived bound"
    assert perturbed > 1, f"{name}: the bound misses a {scale - 1:.1e} relative error"
    return ratio


def assert_gradients_within(grads, ref_grads, bound_grads, dtype=None) -> None:
    """dx, dW, db each within its bound (:func:`assert_within`), and of ``dtype`` if given."""
    for name, a, r, bound in zip(("dx", "dW", "db"), grads, ref_grads, bound_grads, strict=True):
        assert dtype is None or a.dtype == dtype, (name, a.dtype, dtype)
        assert_within(a, r, bound, name)
