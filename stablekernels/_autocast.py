"""Autocast: the dtype policy of torch's own ops, for ours.

Under ``torch.autocast`` torch computes these ops as follows, and so do we:

=================  ==========================================  =========================
op                 CUDA                                        CPU
=================  ==========================================  =========================
softmax,           float32 result (``dtype=torch.float32`` set  input dtype (no rule)
log_softmax        when not given; the input is not copied)
logsumexp          input cast to float32                       input dtype (no rule)
(masked too)
cross_entropy      float32 loss                                float32 loss
linear_cross_      float32 loss; inputs as given, computed     as CUDA
entropy            in float32 (no matmul in a half type)
=================  ==========================================  =========================

A rule applies to float16, bfloat16 and float32 tensors of the autocast device, never to
float64 (as torch). The softmax and logsumexp rules are Autocast kernels of the ops;
cross_entropy's op already returns float32 rows, so its rule is the dtype the public
function rounds the loss to (:func:`loss_dtype`). linear_cross_entropy and its backward run
with autocast off inside (their Autocast kernels change no argument), so that the tiles'
matmuls stay in the accumulation dtype instead of being cast to the autocast dtype.
"""

from __future__ import annotations

import torch

from ._ops import _lib, ops

_AUTOCAST_HALVES_AND_FLOAT = (torch.float16, torch.bfloat16, torch.float32)
# Device types whose autocast runs cross_entropy in float32 (torch: nll_loss on CUDA,
# cross_entropy_loss on CPU).
_FLOAT32_LOSS_DEVICES = ("cpu", "cuda")


def _eligible(t: torch.Tensor) -> bool:
    return t.dtype in _AUTOCAST_HALVES_AND_FLOAT


def loss_dtype(input: torch.Tensor) -> torch.dtype:
    """The dtype of cross_entropy's loss: float32 under autocast of the input's device for
    float16/bfloat16/float32 input, else the input's dtype."""
    device = input.device.type
    if device in _FLOAT32_LOSS_DEVICES and torch.is_autocast_enabled(device) and _eligible(input):
        return torch.float32
    return input.dtype


def _register(name: str, device_type: str, adjust) -> None:
    """An Autocast kernel for op ``name``: ``adjust`` rewrites the arguments, then the op runs
    with this autocast key excluded (as torch's own autocast kernels do)."""
    op = getattr(ops, name).default
    key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    key = getattr(torch._C.DispatchKey, key_name)

    def kernel(*args):
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return op(*adjust(*args))

    _lib.impl(name, kernel, key_name)
    # The Python dispatcher (torch.compile's tracing) looks here first.
    op.py_impl(key)(kernel)


def _float32_result(x, dim, dtype, backend):
    if dtype is None and _eligible(x):
        dtype = torch.float32
    return x, dim, dtype, backend


def _float32_input(x, dim, keepdim, backend):
    return (x.float() if _eligible(x) else x), dim, keepdim, backend


def _masked_float32_result(x, mask, scale, causal_offset, dtype, *rest):
    if dtype is None and _eligible(x):
        dtype = torch.float32
    return x, mask, scale, causal_offset, dtype, *rest


def _masked_float32_input(x, *rest):
    return (x.float() if _eligible(x) else x), *rest


_register("softmax", "cuda", _float32_result)
_register("log_softmax", "cuda", _float32_result)
_register("logsumexp", "cuda", _float32_input)
_register("masked_softmax", "cuda", _masked_float32_result)
_register("masked_logsumexp", "cuda", _masked_float32_input)


def _as_given(*args):
    return args


for _device in _FLOAT32_LOSS_DEVICES:
    _register("linear_cross_entropy", _device, _as_given)
    _register("linear_cross_entropy_backward", _device, _as_given)
