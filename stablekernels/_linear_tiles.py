"""The passes of the linear cross-entropy over tiles of (rows x vocabulary), on any backend.

Two ways through the problem: :func:`forward` and :func:`backward` take vocabulary tiles
(memory: one tile), the backward recomputing the logits; :func:`forward_with_gradient`
takes row chunks over the whole vocabulary (memory: the largest of the budget, the
input's size and MIN_CHUNK_ROWS = 1024 rows of logits, capped at MAX_CHUNK_ELEMENTS) and
computes the gradient of the summed losses as it goes, one matmul fewer in all, for the
usual case of a mean or sum loss differentiated alone.

The logits z = softcap * tanh((x W^T + b) / (temperature * softcap)) (without softcap:
(x W^T + b) / temperature) are never held for all rows and classes: the rows are taken in
chunks and the vocabulary in tiles, and one tile of logits, at most ``TILE_ELEMENTS``
elements in the accumulation dtype (fp32 for halves, fp64 for fp64), lives at a time. Its
matmul is ``torch.mm`` (at::mm: oneDNN/MKL on CPU, cuBLAS on CUDA) on the tile's rows and
classes converted to the accumulation dtype, so no logit is ever rounded to a half type.
Each tile is then handed to the backend's own cross-entropy kernels (the ``Kernels`` record
of :mod:`stablekernels.backends`), which treat it as rows of ``V_tile`` classes:

forward, per tile k: ``(nll_k, smooth_k, lse_k)`` per row (float64), with the target's
local index where the tile holds it; the tiles then merge as the ranks of
:mod:`stablekernels.distributed` do (docs/design.md, section 1.2)::

    lse    = merge_lse(lse_1, ..., lse_K)                   (max + log1p, one term left out)
    nll    = (lse - lse_k*) + nll_k*                        k* the tile holding the target
    smooth = sum_k smooth_k + W_k (lse - lse_k)             W_k the tile's summed weights
    H      = sum_k exp(lse_k - lse) (H_k + (lse - lse_k))   entropy; H_k the tile's own

every added term >= 0, so a dominant tile keeps the others' precision.

A backend whose record has a ``linear_cross_entropy`` kernel (optional in ``Kernels``: the
triton backend's, a ``tl.dot`` kernel with the online lse in its epilogue,
stablekernels/backends/triton/linear_cross_entropy.py) gives :func:`forward` the
per-row ``(nll, smooth, lse)`` itself, merged over its vocabulary splits by the same
formulas, without logits in memory, when no gradient is to be taken through the call (the
backward's recomputed logits then agree with the lse); the entropy stays on the tiles.

backward, per tile: ``dz = kernels.cross_entropy_backward(z, local target, w_k, terms)``,
the per-row terms of the router (the one-hot term only on the rows whose target the tile
holds), plus, for the entropy, ``-g_H p (z - lse)``; then the chain through the softcap
(``1 - tanh^2``) and the temperature, and ``dx += dz W_k``, ``dW_k += dz^T x``,
``db_k += sum_rows dz``, accumulated in the accumulation dtype in a fixed order (row chunks
in order, tiles in order): no atomics, the same bits run to run.
"""

from __future__ import annotations

import torch

from ._numerics import merge_lse

TILE_ELEMENTS = 1 << 22
"""The most elements of one tile of logits, and of one chunk of x or W converted to the
accumulation dtype (16 MiB each in fp32). Tests lower it to cross many tiles."""


MIN_CHUNK_ROWS = 1024
"""The fewest rows of a chunk of :func:`forward_with_gradient` (all of them if fewer), unless
they would hold more than MAX_CHUNK_ELEMENTS logits."""

MAX_CHUNK_ELEMENTS = 1 << 26
"""The most logits of a chunk of :func:`forward_with_gradient` that MIN_CHUNK_ROWS asks for
(256 MiB of fp32)."""


USE_FUSED_FORWARD = True
"""Whether :func:`forward` uses a backend's fused ``linear_cross_entropy`` where it offers
one (module doc). Tests turn it off to compare with the tiles."""


def _steps(rows: int, hidden: int, vocab: int) -> tuple[int, int]:
    """(row chunk, vocabulary tile): the tile up to 4096 classes and its weights within the
    budget, the row chunk filling the budget with logits and with inputs."""
    budget = TILE_ELEMENTS
    vocab_step = max(1, min(vocab, 4096, budget // max(hidden, 1)))
    row_step = max(1, min(rows, budget // vocab_step, budget // max(hidden, 1)))
    return row_step, vocab_step


def _slices(total: int, step: int):
    for start in range(0, total, step):
        yield slice(start, min(total, start + step))


class Logits:
    """The logits of the problem for one chunk of rows and one tile of classes."""

    def __init__(self, weight, bias, softcap, temperature, acc):
        self.weight, self.bias = weight, bias
        self.softcap, self.temperature, self.acc = softcap, temperature, acc

    def weights(self, classes: slice):
        """(part, W[part] in the accumulation dtype) covering ``classes``: one view when W
        is in it already, else parts of at most TILE_ELEMENTS converted one at a time."""
        if self.weight.dtype == self.acc:
            yield classes, self.weight[classes]
            return
        step = max(1, TILE_ELEMENTS // max(self.weight.shape[1], 1))
        for start in range(classes.start, classes.stop, step):
            part = slice(start, min(classes.stop, start + step))
            yield part, self.weight[part].to(self.acc)

    def raw(self, x_acc: torch.Tensor, classes: slice) -> torch.Tensor:
        """x W[classes]^T + b[classes] of rows ``x_acc`` (already in the accumulation dtype):
        (rows, tile), contiguous, in the accumulation dtype; one matmul (a half W: one per
        part of it converted, :meth:`weights`)."""
        parts = list(self.weights(classes))
        bias = None if self.bias is None else self.bias[classes].to(self.acc)
        if len(parts) == 1:  # the bias is the GEMM's initial value, as F.linear's addmm
            w = parts[0][1].t()
            z = torch.mm(x_acc, w) if bias is None else torch.addmm(bias, x_acc, w)
        else:
            z = x_acc.new_empty(x_acc.shape[0], classes.stop - classes.start)
            for part, w in parts:
                local = slice(part.start - classes.start, part.stop - classes.start)
                z[:, local] = torch.mm(x_acc, w.t())
            if bias is not None:
                z += bias
        return z

    def tile(self, x_acc: torch.Tensor, classes: slice):
        """(z, tanh) of rows ``x_acc`` (already in the accumulation dtype) for ``classes``:
        z (rows, tile) contiguous; tanh is the softcap's tanh (None without softcap)."""
        z = self.raw(x_acc, classes)
        if self.temperature != 1.0:
            z /= self.temperature
        if self.softcap is None:
            return z, None
        tanh = torch.tanh(z / self.softcap)
        return tanh * self.softcap, tanh


def _owned(target, counted, classes: slice):
    """Which rows' targets the tile holds, and their local indices (0 elsewhere)."""
    owned = counted & (target >= classes.start) & (target < classes.stop)
    return owned, torch.where(owned, target - classes.start, 0)


def _gradient_follows(x, logits: Logits) -> bool:
    """Whether autograd will take this call's gradient, as far as the op sees it (grad mode
    on and an input requiring grad: eager autograd). The backward then recomputes the
    logits with ``torch.mm``, and an lse made from the same products keeps the gradient's
    rounding that of the logits; a fused kernel's lse, from products summed in another
    order, differs from them by their float32 rounding (|lse| x eps), about twice the
    gradient error. Under torch.func and torch.compile the op cannot see it (False)."""
    tensors = (x, logits.weight, logits.bias)
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def forward(kernels, x, logits: Logits, target, counted, class_weight, smoothing, entropy):
    """Per-row (nll, smooth, lse, H) in float64 of x (R, H) against the logits' (V, H)
    weights; ``smooth`` is 0 unless ``smoothing``, H is empty unless ``entropy``.
    ``target`` are class indices in [0, V) (an ignored row's is any valid class),
    ``counted`` the rows that count, ``class_weight`` (V,) in the accumulation dtype or
    None. Without ``entropy`` and without a gradient to follow (:func:`_gradient_follows`),
    a backend's fused ``linear_cross_entropy`` does it all (module doc;
    ``USE_FUSED_FORWARD``)."""
    rows, hidden = x.shape
    vocab = logits.weight.shape[0]
    f64 = {"dtype": torch.float64, "device": x.device}
    fused = getattr(kernels, "linear_cross_entropy", None) if USE_FUSED_FORWARD else None
    if fused is not None and not entropy and not _gradient_follows(x, logits):
        nll, smooth, lse = fused(
            x, logits.weight, logits.bias, target, class_weight, logits.softcap,
            logits.temperature, smoothing,
        )  # fmt: skip
        return nll, smooth, lse, torch.zeros(0, **f64)
    row_step, vocab_step = _steps(rows, hidden, vocab)
    if getattr(kernels, "cross_entropy_tile", None) is not None:
        class_weight = None if class_weight is None else class_weight.contiguous()
        state = torch.empty(rows, STATE_FIELDS, **f64)
        for r in _slices(rows, row_step):
            x_acc, target_r, state_r = x[r].to(logits.acc), target[r], state[r]
            for classes in _slices(vocab, vocab_step):
                kernels.cross_entropy_tile(
                    logits.raw(x_acc, classes), target_r, classes.start, class_weight,
                    logits.softcap, logits.temperature, smoothing, entropy, state_r,
                )  # fmt: skip
        return _finished(state, entropy)
    nll, smooth, lse = (torch.zeros(rows, **f64) for _ in range(3))
    ent = torch.zeros(rows if entropy else 0, **f64)
    tiles = list(_slices(vocab, vocab_step))
    tile_weights = [
        float(t.stop - t.start) if class_weight is None else class_weight[t].double().sum()
        for t in tiles
    ]
    for r in _slices(rows, row_step):
        x_acc = x[r].to(logits.acc)
        part_lse, part_smooth, part_ent = [], [], []
        own_lse, own_nll = (
            torch.zeros(r.stop - r.start, **f64),
            torch.zeros(r.stop - r.start, **f64),
        )
        for classes in tiles:
            z, _ = logits.tile(x_acc, classes)
            owned, local = _owned(target[r], counted[r], classes)
            w = None if class_weight is None else class_weight[classes]
            nll_k, smooth_k, lse_k = kernels.cross_entropy(z, local, w, smoothing)
            own_lse = torch.where(owned, lse_k, own_lse)
            own_nll = torch.where(owned, nll_k, own_nll)
            part_lse.append(lse_k)
            part_smooth.append(smooth_k)
            if entropy:
                p = kernels.softmax(z, 1, z.dtype, False)
                part_ent.append(torch.special.entr(p).sum(1).double())
        lse_r = merge_lse(torch.stack(part_lse, 1), 1)
        lse[r] = lse_r
        nll[r] = (lse_r - own_lse) + own_nll
        if smoothing:
            smooth[r] = sum(
                s + w * (lse_r - k)
                for s, w, k in zip(part_smooth, tile_weights, part_lse, strict=True)
            )
        if entropy:
            total = torch.zeros_like(lse_r)
            for h_k, lse_k in zip(part_ent, part_lse, strict=True):
                share = torch.exp(lse_k - lse_r)
                total += torch.where(share > 0, share * (h_k + (lse_r - lse_k)), 0.0)
            ent[r] = torch.where(lse_r.isfinite(), total, float("nan"))
    return nll, smooth, lse, ent


STATE_FIELDS = 10
"""The columns of a row's running state in the tile epilogues (``cross_entropy_tile``):
(m, s', gaps, W, ent, z_t, nll, smooth, lse, H), csrc/include/stablekernels/linear_tiles.h."""


def _finished(state, entropy: bool):
    """(nll, smooth, lse, H) of the rows' states after their last tile: views of its
    columns, but the lse, an output of the op, contiguous (one copy); H empty unless
    ``entropy``."""
    ent = state[:, 9] if entropy else state.new_empty(0)
    return state[:, 6], state[:, 7], state[:, 8].contiguous(), ent


def _epilogues(kernels) -> bool:
    """Whether the backend has both tile epilogues (module doc)."""
    return (
        getattr(kernels, "cross_entropy_tile", None) is not None
        and getattr(kernels, "cross_entropy_tile_backward", None) is not None
    )


def _gradient_chunk(kernels, z, tanh, temperature, local, w, terms, grad_entropy=None):
    """dz of a tile from the per-row ``terms`` (module doc), chained through the softcap
    and the temperature back to x W^T + b."""
    dz = kernels.cross_entropy_backward(z, local, w, terms)
    if grad_entropy is not None:
        shifted = (z - terms[:, 0:1]) - terms[:, 1:2]  # z - lse, split
        p = torch.exp(shifted)
        dz -= torch.where(p > 0, p * shifted, 0.0) * grad_entropy[:, None]
    _chain(dz, tanh, temperature)
    return dz


def _chain(dz, tanh, temperature):
    """dz along the capped logits, in place, to dz along x W^T + b: through the softcap
    (1 - tanh^2) and the temperature."""
    if tanh is not None:
        dz *= 1 - tanh * tanh
    if temperature != 1.0:
        dz /= temperature


def _into(out, a, b, first: bool):
    """out = a @ b when ``first`` (no zero fill, no read of out), else out += a @ b."""
    if first:
        torch.mm(a, b, out=out)
    else:
        out.addmm_(a, b)


def _gradient_buffers(x, logits: Logits):
    """Uninitialised (dx, dW, db) in the accumulation dtype (db None without a bias): every
    element is written by the first contribution to it (``_accumulate_gradient``)."""
    rows, hidden = x.shape
    vocab, acc = logits.weight.shape[0], logits.acc
    dx = torch.empty(rows, hidden, dtype=acc, device=x.device)
    dw = torch.empty(vocab, hidden, dtype=acc, device=x.device)
    db = None if logits.bias is None else torch.empty(vocab, dtype=acc, device=x.device)
    return dx, dw, db


def _accumulate_gradient(logits: Logits, dz, classes: slice, x_acc, dx_rows, dw, db, *, first_tile,
                         first_chunk):  # fmt: skip
    """The tile's share of the gradient: dx_rows += dz W[classes], dW[classes] += dz^T x,
    db[classes] += sum over rows of dz (db None without a bias); ``first_tile`` (the rows'
    first tile) writes dx_rows, ``first_chunk`` (the classes' first row chunk) dW and db."""
    for part, w in logits.weights(classes):
        local = slice(part.start - classes.start, part.stop - classes.start)
        _into(dx_rows, dz[:, local], w, first_tile and part.start == classes.start)
    _into(dw[classes], dz.t(), x_acc, first_chunk)
    if db is not None:
        if first_chunk:
            torch.sum(dz, 0, out=db[classes])
        else:
            db[classes] += dz.sum(0)


def _tile_terms(terms, owned):
    """The rows' terms for one tile: the one-hot term only on the rows whose target it holds."""
    terms_k = terms.clone()
    terms_k[:, 4] = torch.where(owned, terms_k[:, 4], 0.0)
    return terms_k


def forward_with_gradient(kernels, x, logits: Logits, target, counted, class_weight, smoothing,
                          unit_terms):  # fmt: skip
    """Per-row (nll, smooth, lse) as :func:`forward`, and the gradient (dx, dW, db) of the
    summed per-row losses (each row's gradient 1), in one pass: the rows in chunks whose
    logits over the whole vocabulary fit in the largest of the budget, the input's size and
    MIN_CHUNK_ROWS rows, each chunk's logits made once; their lse known, they are overwritten
    by dz (no second chunk-sized buffer: by the backend's in-place kernel where it has one,
    else one vocabulary tile at a time), in place of a second matmul in the backward.
    ``unit_terms(lse, rows)`` gives the router's per-row terms of those rows for a gradient
    of 1. What the autograd rule scales when the loss is reduced by a sum or a mean (a
    uniform per-row gradient); db is None without a bias."""
    rows, hidden = x.shape
    vocab = logits.weight.shape[0]
    # Chunks of at least MIN_CHUNK_ROWS rows: each chunk re-reads W twice and re-writes dW,
    # which on a CPU costs as much as the matmuls of thin chunks (1024 x 1024 x 32000: chunks
    # of 131 rows 35% slower than of 256; 4096 x 1024 x 32000, timed interleaved in one
    # process: chunks of 512 rows 5.23 s, of 1024 5.01 s, of 4096 4.88 s).
    # At most MAX_CHUNK_ELEMENTS of them (a 128256-word vocabulary: 512 rows, 256 MiB of fp32
    # logits, as fast as 1024 rows there and half the memory beside the weight's gradient).
    budget = max(TILE_ELEMENTS, rows * hidden, min(MIN_CHUNK_ROWS * vocab, MAX_CHUNK_ELEMENTS))
    row_step = max(1, min(rows, budget // vocab))
    _, vocab_step = _steps(rows, hidden, vocab)
    in_place = getattr(kernels, "cross_entropy_backward_inplace", None)
    f64 = {"dtype": torch.float64, "device": x.device}
    dx, dw, db = _gradient_buffers(x, logits)
    if _epilogues(kernels):  # the chunk is one tile: its logits become dz in one kernel
        class_weight = None if class_weight is None else class_weight.contiguous()
        state = torch.empty(rows, STATE_FIELDS, **f64)
        options = (logits.softcap, logits.temperature)
        for r in _slices(rows, row_step):
            x_acc, target_r, state_r = x[r].to(logits.acc), target[r], state[r]
            y = logits.raw(x_acc, slice(0, vocab))
            kernels.cross_entropy_tile(
                y, target_r, 0, class_weight, *options, smoothing, False, state_r
            )
            terms = unit_terms(state_r[:, 8], r)
            kernels.cross_entropy_tile_backward(y, target_r, 0, class_weight, terms, *options, None)
            _accumulate_gradient(
                logits, y, slice(0, vocab), x_acc, dx[r], dw, db,
                first_tile=True, first_chunk=r.start == 0,
            )  # fmt: skip
            del y  # before the next chunk's logits are made
        nll, smooth, lse, _ = _finished(state, False)
        return nll, smooth, lse, dx, dw, db
    nll, smooth, lse = (torch.zeros(rows, **f64) for _ in range(3))
    for r in _slices(rows, row_step):
        x_acc = x[r].to(logits.acc)
        z, tanh = logits.tile(x_acc, slice(0, vocab))
        nll[r], smooth[r], lse[r] = kernels.cross_entropy(z, target[r], class_weight, smoothing)
        terms = unit_terms(lse[r], r)
        if in_place is not None:  # z becomes dz in one pass of the backend's kernel
            in_place(z, target[r], class_weight, terms)
            _chain(z, tanh, logits.temperature)
        else:  # z becomes dz a tile at a time
            for classes in _slices(vocab, vocab_step):
                owned, local = _owned(target[r], counted[r], classes)
                w = None if class_weight is None else class_weight[classes]
                z[:, classes] = _gradient_chunk(
                    kernels, z[:, classes], None if tanh is None else tanh[:, classes],
                    logits.temperature, local, w, _tile_terms(terms, owned),
                )  # fmt: skip
        del tanh
        _accumulate_gradient(
            logits, z, slice(0, vocab), x_acc, dx[r], dw, db,
            first_tile=True, first_chunk=r.start == 0,
        )  # fmt: skip
        del z  # before the next chunk's logits are made
    return nll, smooth, lse, dx, dw, db


def backward(kernels, x, logits: Logits, target, counted, class_weight, terms, grad_entropy):
    """(dx, dW, db) in the accumulation dtype: the gradient of the per-row losses whose
    derivative along the logits is, per tile, what ``kernels.cross_entropy_backward`` maps
    ``terms`` (R, 5) = (hi, lo, coef, smooth, one_hot) to, plus ``-g_H p (z - lse)`` when
    ``grad_entropy`` (R,) is given; db is None without a bias."""
    rows, hidden = x.shape
    vocab = logits.weight.shape[0]
    row_step, vocab_step = _steps(rows, hidden, vocab)
    dx, dw, db = _gradient_buffers(x, logits)
    if _epilogues(kernels):  # per tile: its matmul, one kernel, the gradient's matmuls
        # the one-hot term on counted rows only (the router's terms have it so but for a
        # class weight that is not finite), once; the kernel applies it where the tile holds
        # the target
        terms = terms.clone()
        terms[:, 4] = torch.where(counted, terms[:, 4], 0.0)
        class_weight = None if class_weight is None else class_weight.contiguous()
        grad_entropy = None if grad_entropy is None else grad_entropy.contiguous()
        for r in _slices(rows, row_step):
            x_acc, target_r, terms_r = x[r].to(logits.acc), target[r], terms[r]
            g_entropy = None if grad_entropy is None else grad_entropy[r]
            for classes in _slices(vocab, vocab_step):
                y = logits.raw(x_acc, classes)
                kernels.cross_entropy_tile_backward(
                    y, target_r, classes.start, class_weight, terms_r, logits.softcap,
                    logits.temperature, g_entropy,
                )  # fmt: skip
                _accumulate_gradient(
                    logits, y, classes, x_acc, dx[r], dw, db,
                    first_tile=classes.start == 0, first_chunk=r.start == 0,
                )  # fmt: skip
        return dx, dw, db
    for r in _slices(rows, row_step):
        x_acc = x[r].to(logits.acc)
        for classes in _slices(vocab, vocab_step):
            z, tanh = logits.tile(x_acc, classes)
            owned, local = _owned(target[r], counted[r], classes)
            w = None if class_weight is None else class_weight[classes]
            g_entropy = None if grad_entropy is None else grad_entropy[r]
            dz = _gradient_chunk(
                kernels, z, tanh, logits.temperature, local, w, _tile_terms(terms[r], owned),
                g_entropy,
            )  # fmt: skip
            _accumulate_gradient(
                logits, dz, classes, x_acc, dx[r], dw, db,
                first_tile=classes.start == 0, first_chunk=r.start == 0,
            )  # fmt: skip
    return dx, dw, db
