"""sk.distributed with 2 and 3 gloo ranks on 127.0.0.1: loss, lse and each rank's gradient
against the single-process results (uneven shards, label smoothing, ignore_index, a huge
logit), and the bytes communicated per call, which must not grow with the classes."""

from __future__ import annotations

import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import stablekernels as sk

from .conftest import SUBPROCESS_TIMEOUT_S

ROWS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bounds(classes: int, world: int) -> list[int]:
    """Uneven split points of the class dim: rank r holds [bounds[r], bounds[r + 1])."""
    weights = [r + 1 for r in range(world)]
    cuts = [0]
    for w in weights:
        cuts.append(cuts[-1] + classes * w // sum(weights))
    cuts[-1] = classes
    return cuts


def _data(classes: int):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, classes, generator=gen, dtype=torch.float64) * 3
    x[0, 5] = 1e4  # a huge logit, target elsewhere
    x[1, 7] = 1e4  # a huge logit at the target
    target = torch.randint(0, classes, (ROWS,), generator=gen)
    target[1] = 7
    target[2] = -100  # ignored
    return x.float(), target


class _CountingCollectives:
    """Counts the bytes this rank sends through all_gather / all_reduce."""

    def __init__(self):
        self.bytes = 0
        self._gather, self._reduce = dist.all_gather, dist.all_reduce

    def __enter__(self):
        def gather(out, tensor, *a, **k):
            self.bytes += tensor.numel() * tensor.element_size()
            return self._gather(out, tensor, *a, **k)

        def reduce(tensor, *a, **k):
            self.bytes += tensor.numel() * tensor.element_size()
            return self._reduce(tensor, *a, **k)

        dist.all_gather, dist.all_reduce = gather, reduce
        return self

    def __exit__(self, *exc):
        dist.all_gather, dist.all_reduce = self._gather, self._reduce


def _worker(rank, world, port, failures):
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
        )
        for classes in (50, 4000):
            x, target = _data(classes)
            cuts = _bounds(classes, world)
            lo, hi = cuts[rank], cuts[rank + 1]
            for smoothing in (0.0, 0.1):
                for reduction in ("mean", "sum", "none"):
                    full = x.clone().requires_grad_()
                    ref = sk.cross_entropy(
                        full, target, reduction=reduction, label_smoothing=smoothing
                    )
                    ref.sum().backward()
                    shard = x[:, lo:hi].clone().requires_grad_()
                    with _CountingCollectives() as counter:
                        ours = sk.distributed.cross_entropy(
                            shard, target, reduction=reduction, label_smoothing=smoothing
                        )
                    ours.sum().backward()
                    torch.testing.assert_close(ours, ref, rtol=2e-6, atol=2e-5)
                    torch.testing.assert_close(
                        shard.grad, full.grad[:, lo:hi], rtol=1e-5, atol=1e-7
                    )
                    # O(rows): a few numbers per row and rank, whatever the classes.
                    assert counter.bytes <= 8 * (6 * ROWS + 1), counter.bytes
            full = x.clone().requires_grad_()
            ref = torch.logsumexp(full, -1)
            ref.sum().backward()
            shard = x[:, lo:hi].clone().requires_grad_()
            with _CountingCollectives() as counter:
                ours = sk.distributed.logsumexp(shard, -1)
            ours.sum().backward()
            torch.testing.assert_close(ours, ref)
            torch.testing.assert_close(shard.grad, full.grad[:, lo:hi])
            assert counter.bytes <= 8 * ROWS, counter.bytes
            kept = sk.distributed.logsumexp(x[:, lo:hi].t().contiguous(), 0, keepdim=True)
            torch.testing.assert_close(kept, ref[None, :])
        # Ranks passing different targets fail on every rank, instead of a wrong loss.
        x, target = _data(50)
        cuts = _bounds(50, world)
        mismatched = target.clone()
        mismatched[3] = (target[3] + rank) % 50
        with pytest.raises(ValueError, match="target differs across the ranks"):
            sk.distributed.cross_entropy(x[:, cuts[rank] : cuts[rank + 1]], mismatched)
        dist.destroy_process_group()
    except Exception:
        failures.put(f"rank {rank}: {traceback.format_exc()}")
        raise


@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_matches_single_process(world):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    context = mp.get_context("spawn")
    failures = context.Queue()
    port = _free_port()
    processes = [
        context.Process(target=_worker, args=(r, world, port, failures)) for r in range(world)
    ]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout=SUBPROCESS_TIMEOUT_S)
    errors = []
    while not failures.empty():
        errors.append(failures.get())
    assert not errors, "\n".join(errors)
    assert all(p.exitcode == 0 for p in processes), [p.exitcode for p in processes]
