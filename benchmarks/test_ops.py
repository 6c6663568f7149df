"""The pytest-benchmark suite: one benchmark per op x direction x provider x shape x dtype,
grouped by op-direction-shape-dtype so that every provider of a group is compared side by
side (``--benchmark-group-by=group``, the default here).

GPU timings synchronize inside the timed function. The first call (where torch.compile and
Triton compile) is made before timing and recorded in extra_info as ``first_call_s``, with
the bytes moved, GB/s and whether the output matched the float64 reference.
"""

from __future__ import annotations

import time

import torch

from .cases import check, make_grad, make_input, make_target, reference
from .conftest import bench_device
from .runner import Rotation, copies_for_cold_cache, forward_of, run_once, timed_callable


def test_op(benchmark, case, provider, request):
    device = torch.device(bench_device(request.config))
    x = make_input(case, device)
    dy = make_grad(case, device) if case.direction == "backward" else None
    target = make_target(case, device)
    forward = forward_of(case, provider, target)

    start = time.perf_counter()
    out = run_once(case, forward, x, dy)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first_call_s = time.perf_counter() - start
    correct, note = check(case, out, reference(case, x, dy, target))

    call = timed_callable(case, forward, Rotation(x, dy, copies_for_cold_cache(case, device)))
    if device.type == "cuda":

        def timed():
            call()
            torch.cuda.synchronize(device)
    else:
        timed = call

    benchmark.group = case.group
    benchmark.extra_info.update(
        op=case.op,
        direction=case.direction,
        shape=case.shape_label,
        dtype=str(case.dtype),
        provider=provider.name,
        bytes_moved=case.bytes_moved(),
        first_call_s=first_call_s,
        correct=correct,
        note=note,
    )
    benchmark(timed)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["gbs"] = case.bytes_moved() / stats.stats.median / 1e9
