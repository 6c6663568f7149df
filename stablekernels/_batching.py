"""Batching rules (``torch.vmap``) of every op of :mod:`stablekernels._ops`.

Each rule folds the vmapped dim into the op's own batch and calls the op once, with no copy
where a view does:

* softmax, log_softmax, logsumexp and their backward ops work along one ``dim`` of any
  shape: the vmapped dim moves to the front and ``dim`` shifts by one (a logical 0-dim
  input becomes a row of one);
* cross_entropy and its backward work on (rows, C): the vmapped dim and the rows flatten
  into one row dim. Per-sample class weights cannot share one call, so a vmapped ``weight``
  runs one call per sample;
* linear_cross_entropy and its backward run one call per sample (each sample its own
  tiled problem, whose weights may differ per sample).

Unbatched tensor arguments beside batched ones are expanded (a view; the ops make their
inputs contiguous where they need to). Rules get ``(info, in_dims, *args)`` and return
``(output, out_dims)``, as ``torch.library.register_vmap`` asks.
"""

from __future__ import annotations

import torch

from ._ops import NAMESPACE, _lib, ops, wrap_dim


def _front(t: torch.Tensor | None, in_dim: int | None, size: int) -> torch.Tensor | None:
    """``t`` with its vmapped dim first; an unbatched tensor expanded to ``size`` there."""
    if t is None:
        return None
    if in_dim is None:
        return t.expand(size, *t.shape)
    return t.movedim(in_dim, 0)


def _per_sample(op, info, in_dims, args):
    """One call per sample, outputs stacked: for batches the op cannot fold."""
    results = []
    for i in range(info.batch_size):
        sample = [a if d is None else a.select(d, i) for a, d in zip(args, in_dims, strict=True)]
        results.append(op(*sample))
    if isinstance(results[0], tuple):
        return tuple(torch.stack(r) for r in zip(*results, strict=True)), (0,) * len(results[0])
    return torch.stack(results), 0


def _softmax_rule(name: str):
    op = getattr(ops, name).default

    def rule(info, in_dims, x, dim, dtype, backend):
        x = _front(x, in_dims[0], info.batch_size)
        if x.dim() == 1:  # a logical 0-dim input: a row of one
            return op(x.unsqueeze(1), 1, dtype, backend).squeeze(1), 0
        return op(x, wrap_dim(name, dim, x.dim() - 1) + 1, dtype, backend), 0

    return rule


def _softmax_backward_rule(name: str):
    op = getattr(ops, name).default

    def rule(info, in_dims, grad, output, dim, input_dtype, backend):
        grad = _front(grad, in_dims[0], info.batch_size)
        output = _front(output, in_dims[1], info.batch_size)
        if output.dim() == 1:
            dx = op(grad.unsqueeze(1), output.unsqueeze(1), 1, input_dtype, backend)
            return dx.squeeze(1), 0
        return op(grad, output, wrap_dim(name, dim, output.dim() - 1) + 1, input_dtype, backend), 0

    return rule


def _logsumexp_rule(info, in_dims, x, dim, keepdim, backend):
    x = _front(x, in_dims[0], info.batch_size)
    if x.dim() == 1:
        return ops.logsumexp(x.unsqueeze(1), 1, False, backend), (0, 0)
    return ops.logsumexp(x, wrap_dim("logsumexp", dim, x.dim() - 1) + 1, keepdim, backend), (0, 0)


def _logsumexp_backward_rule(info, in_dims, grad, x, result, dim, keepdim, backend):
    size = info.batch_size
    batched = zip((grad, x, result), in_dims[:3], strict=True)
    grad, x, result = (_front(t, d, size) for t, d in batched)
    if x.dim() == 1:
        dx = ops.logsumexp_backward(grad, x.unsqueeze(1), result, 1, False, backend)
        return dx.squeeze(1), 0
    dim = wrap_dim("logsumexp_backward", dim, x.dim() - 1) + 1
    return ops.logsumexp_backward(grad, x, result, dim, keepdim, backend), 0


def _flat_rows(t: torch.Tensor | None, in_dim, size: int) -> torch.Tensor | None:
    """A per-row (R,) or (R, C) tensor of every sample as (size * R,) or (size * R, C)."""
    t = _front(t, in_dim, size)
    return None if t is None else t.flatten(0, 1)


def _cross_entropy_rule(info, in_dims, logits, target, weight, *options):
    reduction = options[3]
    if in_dims[2] is not None or reduction != "none":
        args = (logits, target, weight, *options)
        return _per_sample(ops.cross_entropy.default, info, in_dims, args)
    size = info.batch_size
    loss, lse, counts = ops.cross_entropy(
        _flat_rows(logits, in_dims[0], size), _flat_rows(target, in_dims[1], size), weight, *options
    )
    # counts is of the flattened call: it is not what one sample's forward gives, and only a
    # "mean" backward reads it (which runs per sample).
    counts = counts.expand(size, 3)
    return (loss.unflatten(0, (size, -1)), lse.unflatten(0, (size, -1)), counts), (0, 0, 0)


def _cross_entropy_backward_rule(info, in_dims, *args):
    grad_loss, grad_lse, logits, target, weight, lse, counts, *options = args
    if in_dims[4] is not None or options[3] != "none":
        return _per_sample(ops.cross_entropy_backward.default, info, in_dims, args)
    size = info.batch_size
    flat = [
        _flat_rows(t, d, size)
        for t, d in zip((grad_loss, grad_lse, logits, target), in_dims[:4], strict=True)
    ]
    lse = _flat_rows(lse, in_dims[5], size)
    counts = _front(counts, in_dims[6], size)[0] if in_dims[6] is not None else counts
    dx = ops.cross_entropy_backward(*flat, weight, lse, counts, *options)
    return dx.unflatten(0, (size, -1)), 0


def _per_sample_rule(name: str):
    op = getattr(ops, name).default
    return lambda info, in_dims, *args: _per_sample(op, info, in_dims, args)


RULES = {
    "softmax": _softmax_rule("softmax"),
    "log_softmax": _softmax_rule("log_softmax"),
    "logsumexp": _logsumexp_rule,
    "softmax_backward": _softmax_backward_rule("softmax_backward"),
    "log_softmax_backward": _softmax_backward_rule("log_softmax_backward"),
    "logsumexp_backward": _logsumexp_backward_rule,
    "cross_entropy": _cross_entropy_rule,
    "cross_entropy_backward": _cross_entropy_backward_rule,
    "linear_cross_entropy": lambda info, in_dims, *args: _per_sample(
        ops.linear_cross_entropy.default, info, in_dims, args
    ),
    "linear_cross_entropy_backward": lambda info, in_dims, *args: _per_sample(
        ops.linear_cross_entropy_backward.default, info, in_dims, args
    ),
    # The masked ops (the causal index is a row's place along dim -2, the mask broadcast
    # against each sample): one call per sample.
    **{
        name: _per_sample_rule(name)
        for name in ("masked_softmax", "masked_softmax_backward", "masked_logsumexp")
    },
}
for _name, _rule in RULES.items():
    torch.library.register_vmap(f"{NAMESPACE}::{_name}", _rule, lib=_lib)
