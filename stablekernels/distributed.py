"""Vocab-parallel log-sum-exp and cross-entropy over ``torch.distributed``.

Each rank of the process group holds a contiguous slice of the class dimension, in rank
order; slices may differ in size (the offsets are gathered, not assumed). Each rank computes
its local statistics with the local kernels (whatever backend serves the shard's device),
the ranks exchange O(rows) numbers in one ``all_gather`` (cross_entropy gathers the shard
sizes before it, one number per rank, to know which rank owns a target), and every rank
returns the full
result. The backward of each rank covers its own slice, exactly the slice of the
single-process gradient, with no communication.

The local statistics per row: the shard's lse (fp64), its max, and for label smoothing the
sum of (max - x) over the shard; the ranks' lse merge as lse = M + log1p(sum over the other
ranks of exp(lse_k - M)), M the largest (the merge rule of docs/design.md, with one term left out).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import backends
from ._api import _check_tensor, resolve_backend
from ._numerics import accumulation_dtype, merge_lse
from .backends import torch_ce
from .ops._checks import wrap_dim
from .ops._library import ops


def _world(group):
    return dist.get_world_size(group), dist.get_rank(group)


def _gather(local: torch.Tensor, group) -> torch.Tensor:
    """(world, *local.shape): every rank's ``local`` (same shape on every rank)."""
    world, _ = _world(group)
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.stack(parts)


def _local_lse(rows: torch.Tensor, backend: str) -> torch.Tensor:
    """Per-row lse (fp64) of a (rows, local classes) shard; -inf for an empty shard."""
    if rows.shape[-1] == 0:
        return torch.full(rows.shape[:-1], float("-inf"), dtype=torch.float64, device=rows.device)
    return ops.logsumexp(rows, -1, False, backend)[1]


class _LogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, group, backend):
        lse = merge_lse(_gather(_local_lse(rows, backend), group), 0)
        ctx.save_for_backward(rows, lse)
        ctx.backend = backend
        return lse

    @staticmethod
    def backward(ctx, grad):
        rows, lse = ctx.saved_tensors
        if rows.shape[-1] == 0:
            return torch.zeros_like(rows), None, None
        # d lse / d x_c = exp(x_c - lse): this rank's columns of the global softmax.
        dx = ops.logsumexp_backward(grad, rows, lse, rows.dim() - 1, False, ctx.backend)
        return dx, None, None


def logsumexp(shard: torch.Tensor, dim: int = -1, keepdim: bool = False, group=None):
    """``torch.logsumexp`` of the full tensor, of which this rank holds the slice ``shard``
    of dim ``dim`` (slices in rank order, any sizes). Every rank returns the full result, in
    the shard's dtype, of the reduced shape. Gradients flow to this rank's shard only."""
    shard = _check_tensor("distributed.logsumexp", shard)
    dim = wrap_dim("distributed.logsumexp", dim, shard.dim())
    backend = resolve_backend(None, shard.device)
    rows = shard.movedim(dim, -1)
    lse = _LogSumExp.apply(rows, group, backend)
    result = lse.to(shard.dtype)
    return result.unsqueeze(dim) if keepdim else result


class _CrossEntropy(torch.autograd.Function):
    """Per-row losses of (rows, local classes) shards; class targets are global indices."""

    @staticmethod
    def forward(ctx, rows, target, ignore_index, label_smoothing, group, backend):
        world, rank = _world(group)
        local = rows.shape[-1]
        sizes = _gather(torch.tensor([local], device=rows.device), group).reshape(-1)
        offset = int(sizes[:rank].sum())
        classes = int(sizes.sum())
        acc = accumulation_dtype(rows.dtype)
        # Local statistics, one row of numbers per row: lse, max, gap sum, own x_t, owned.
        lse = _local_lse(rows, backend)
        counted = target != ignore_index
        owned = counted & (target >= offset) & (target < offset + local)
        t_local = torch.where(owned, target - offset, 0)
        x_t = (
            rows.gather(-1, t_local[:, None])[:, 0].double() if local else lse.new_zeros(lse.shape)
        )
        # The target itself travels too (exact in fp64 below 2^53), so that ranks holding
        # different targets fail loudly instead of computing a wrong loss.
        stats = [lse, torch.where(owned, x_t, 0.0), owned.double(), target.double()]
        if label_smoothing:
            m = rows.amax(-1).to(acc) if local else lse.new_full(lse.shape, float("-inf"))
            gaps = (
                (m[:, None] - rows.to(acc)).sum(-1).double() if local else lse.new_zeros(lse.shape)
            )
            stats += [m.double(), gaps]
        table = _gather(torch.stack(stats, -1), group)  # (world, rows, 4 or 6): O(rows)
        targets = table[..., 3]
        if bool((targets.amax(0) != targets.amin(0)).any()):
            row = int((targets.amax(0) != targets.amin(0)).nonzero()[0, 0])
            raise ValueError(
                f"target differs across the ranks of the group (row {row}: "
                f"{targets[:, row].long().tolist()}); every rank must pass the same targets"
            )
        total = merge_lse(table[..., 0], 0)
        x_target = table[..., 1].sum(0)
        found = table[..., 2].sum(0) > 0
        smooth = torch.zeros_like(total)
        if label_smoothing:
            sizes64 = sizes.to(torch.float64)[:, None]
            # sum_c (lse - x_c) = sum_k [gaps_k + C_k (lse - m_k)]: every term >= 0
            spread = torch.where(sizes64 > 0, table[..., 4], total)
            smooth = (table[..., 5] + sizes64 * (total - spread)).sum(0)
        bad = counted & ~found
        if bad.any():
            raise IndexError(f"Target {int(target[bad][0])} is out of bounds.")
        loss = torch_ce.row_loss(
            total - x_target, smooth, total, counted, 1.0, classes, label_smoothing, 0.0
        )
        ctx.save_for_backward(rows, total, t_local, owned, counted)
        ctx.options = (label_smoothing, classes, backend)
        return loss.to(acc), total

    @staticmethod
    @torch.autograd.function.once_differentiable  # the kernel below has no derivative
    def backward(ctx, grad_loss, grad_lse):
        rows, total, t_local, owned, counted = ctx.saved_tensors
        label_smoothing, classes, backend = ctx.options
        if rows.numel() == 0:
            return torch.zeros_like(rows), None, None, None, None, None
        if grad_lse is None:
            grad_lse = torch.zeros_like(total)
        # The single-process backward's per-row terms; the one-hot term only where this
        # rank owns the target. The local kernel of the backend then maps them over x.
        terms = torch_ce.per_row_backward_terms(
            grad_loss,
            grad_lse,
            total,
            t_local,
            counted,
            None,
            classes,
            label_smoothing,
            0.0,
            accumulation_dtype(rows.dtype),
        )
        terms[:, 4] = torch.where(owned, terms[:, 4], 0.0)
        kernels = backends.get_backend(backend).kernels()
        dx = kernels.cross_entropy_backward(rows.contiguous(), t_local, None, terms)
        return dx, None, None, None, None, None


def cross_entropy(
    shard: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    group=None,
):
    """Cross-entropy of logits whose class dim (the last) is split across the ranks of
    ``group``: this rank holds ``shard`` of shape (*, C_rank), the classes
    [offset_rank, offset_rank + C_rank) in rank order. ``target`` (*) holds global class
    indices (int64). Every rank returns the full result: reductions "mean" (over counted
    rows; NaN when none), "sum", "none" (shape *), in the shard's dtype. Gradients flow to
    this rank's shard only, each the slice of the single-process gradient; the backward
    communicates nothing."""
    shard = _check_tensor("distributed.cross_entropy", shard)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"{reduction} is not a valid value for reduction")
    if not 0.0 <= label_smoothing <= 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    if shard.dim() < 1 or tuple(target.shape) != tuple(shard.shape[:-1]):
        raise ValueError(
            f"target of shape {tuple(target.shape)} does not match shard "
            f"{tuple(shard.shape)} (classes last)"
        )
    backend = resolve_backend(None, shard.device)
    rows = shard.reshape(-1, shard.shape[-1])
    flat = target.reshape(-1).long()
    loss, _ = _CrossEntropy.apply(rows, flat, ignore_index, float(label_smoothing), group, backend)
    if reduction == "none":
        result = loss.reshape(target.shape)
    elif reduction == "sum":
        result = loss.sum()
    else:
        result = loss.sum() / (flat != ignore_index).sum()
    return result.to(shard.dtype)
