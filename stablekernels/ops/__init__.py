"""The custom ops of the ``stablekernels`` namespace, one module per op family.

Each module holds, next to each other, its ops' public function (or the op-level part of
it), schemas, routers, fake kernels, autograd rules, vmap rules and autocast rules, and
registers them all at its bottom through :func:`stablekernels.ops._library.register`:

* :mod:`.softmax`: softmax, log_softmax and their backward ops;
* :mod:`.logsumexp`: logsumexp and its backward op;
* :mod:`.masked_softmax`: masked_softmax, masked_softmax_backward, masked_logsumexp;
* :mod:`.cross_entropy`: cross_entropy and its backward op;
* :mod:`.linear_cross_entropy`: linear_cross_entropy and its backward op.

Shared: :mod:`._library` (the Library, the registration, the autograd.Function factory,
``call_op`` / ``direct``) and :mod:`._checks` (the argument checks). ``stablekernels``
imports every op module (its ``__init__``); this package imports none, so that
:mod:`stablekernels._api` can use the shared modules without an import circle.
"""
