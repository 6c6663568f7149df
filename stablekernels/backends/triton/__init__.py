"""The ``triton`` backend: Triton kernels for CUDA tensors, and for CPU tensors under the
Triton interpreter (TRITON_INTERPRET=1, set before triton is imported).

softmax.py holds softmax and log_softmax, logsumexp.py logsumexp, each forward and
backward; cross_entropy.py the cross-entropy from logits, its forward, and
cross_entropy_backward.py its backward; linear_cross_entropy.py the fused forward of the
linear cross-entropy (``tl.dot`` with the online lse in its epilogue);
masked_softmax.py the masked (attention-ready) softmax, its forward, and
masked_softmax_backward.py its backward; tiles.py the linear cross-entropy's tile epilogues
(forward and backward);
common.py the row view, launch heuristics and the (m, s') math. Computation is in fp32
(fp64 for fp64 tensors); halves are read as fp32 and rounded once.

Each launcher is a ``torch.library.triton_op`` (``stablekernels::_triton_*``, its kernels
launched through ``wrap_triton``), so it has a fake kernel and, called directly under
``torch.compile``, inductor sees its kernels. The record below is the backend.
"""

from __future__ import annotations

import torch

from .. import Kernels
from . import (  # noqa: F401  (register the triton_ops)
    cross_entropy,
    cross_entropy_backward,
    linear_cross_entropy,
    logsumexp,
    masked_softmax,
    masked_softmax_backward,
    softmax,
    tiles,
)

_ops = torch.ops.stablekernels

KERNELS = Kernels(
    softmax=_ops._triton_softmax,
    softmax_backward=_ops._triton_softmax_backward,
    logsumexp=_ops._triton_logsumexp,
    logsumexp_backward=_ops._triton_logsumexp_backward,
    cross_entropy=_ops._triton_cross_entropy,
    cross_entropy_backward=_ops._triton_cross_entropy_backward,
    cross_entropy_loss=_ops._triton_cross_entropy_loss,
    cross_entropy_loss_backward=_ops._triton_cross_entropy_loss_backward,
    linear_cross_entropy=linear_cross_entropy.linear_cross_entropy,
    masked_softmax=_ops._triton_masked_softmax,
    cross_entropy_tile=_ops._triton_cross_entropy_tile,
    cross_entropy_tile_backward=_ops._triton_cross_entropy_tile_backward,
    masked_softmax_backward=_ops._triton_masked_softmax_backward,
)
