"""stablekernels: fused, numerically stable softmax, log-softmax, log-sum-exp and
cross-entropy for PyTorch.

    import stablekernels as sk
    sk.softmax(x, dim=-1)             sk.log_softmax(x, dim=-1)
    sk.logsumexp(x, dim=-1)           sk.nn.Softmax(dim), sk.nn.LogSoftmax(dim)
    sk.cross_entropy(logits, target)  sk.nn.CrossEntropyLoss()
    sk.linear_cross_entropy(h, W, t)  sk.nn.LinearCrossEntropyLoss()   (no logits held)
    sk.linear_logprobs(h, W, t)       the target's log-probability per row
    sk.available_backends()           with sk.use_backend("torch"): ...
    sk.naive.softmax(x)               the unstable textbook formula, for comparison

The ops are ``torch.ops.stablekernels.*`` custom ops with autograd and fake kernels, so they
work under ``torch.compile(fullgraph=True)``.
"""

from . import distributed, naive, nn  # noqa: F401
from ._api import available_backends, use_backend
from ._cross_entropy import cross_entropy
from ._linear_cross_entropy import linear_cross_entropy, linear_logprobs
from .backends import BackendUnavailableError

# The op modules: importing each registers its ops (stablekernels/ops/__init__.py).
from .ops import cross_entropy as _cross_entropy_ops  # noqa: F401, E402
from .ops import linear_cross_entropy as _linear_cross_entropy_ops  # noqa: F401, E402
from .ops import masked_softmax as _masked_softmax_ops  # noqa: F401, E402
from .ops.logsumexp import logsumexp  # noqa: E402
from .ops.softmax import log_softmax, softmax  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "available_backends",
    "cross_entropy",
    "distributed",
    "linear_cross_entropy",
    "linear_logprobs",
    "log_softmax",
    "logsumexp",
    "naive",
    "nn",
    "softmax",
    "use_backend",
]
