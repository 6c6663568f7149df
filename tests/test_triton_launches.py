"""The Triton launchers' decisions, checked without a GPU: each ``_triton_*`` op is called
on fake CUDA tensors with its kernel launches recorded instead of run
(tools/triton_launches.py): every launch runs with the tensor's device made current, every
grid fits CUDA's limits (1-D, under 2**31 programs) even for rows of 2**30 elements and
more, and the split path merges each row's part states once.

Compiling the recorded launches for real GPUs is tests/test_gpu_static.py's part.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from stablekernels.backends.triton import common
from tools.triton_launches import launch_matrix, recorded_launches

ops = torch.ops.stablekernels
MAX_PROGRAMS = 2**31 - 1


def _grids_fit(launches):
    for launch in launches:
        assert len(launch.grid) == 1, (launch.name, launch.grid)  # y, z limited to 65535
        assert 1 <= launch.grid[0] <= MAX_PROGRAMS, (launch.name, launch.grid)


def test_every_launch_runs_on_the_device_of_its_tensors():
    """cuda:1 while cuda:0 is current: Triton launches on the current device and its
    current stream, so the launcher must make the tensor's device current."""
    launches = launch_matrix(device="cuda:1")
    assert {launch.name for launch in launches} >= {
        "_softmax_fwd_kernel",
        "_softmax_bwd_kernel",
        "_row_parts_kernel",
        "_merge_parts_kernel",
        "_softmax_finish_kernel",
        "_bwd_parts_kernel",
        "_sum_parts_kernel",
        "_bwd_finish_kernel",
        "_logsumexp_fwd_kernel",
        "_logsumexp_finish_kernel",
        "_logsumexp_bwd_kernel",
        "_cross_entropy_fwd_kernel",
        "_cross_entropy_bwd_kernel",
        "_masked_softmax_kernel",
        "_masked_parts_kernel",
        "_masked_softmax_finish_kernel",
        "_masked_lse_kernel",
        "_linear_ce_fwd_kernel",
    }
    wrong = {(launch.name, launch.device) for launch in launches}
    wrong = {(name, device) for name, device in wrong if device != torch.device("cuda:1")}
    assert not wrong, wrong


def test_every_grid_of_the_launch_matrix_fits_cuda_limits():
    _grids_fit(launch_matrix())


def _launch(fn):
    with FakeTensorMode(), recorded_launches() as launches:
        fn()
    return launches


@pytest.mark.parametrize("log", [False, True])
def test_a_row_of_2_to_the_30_elements_launches_within_limits(log):
    """2**30 / SPLIT_CHUNK = 131072 parts: more than a y dimension holds."""
    n = 2**30

    def run():
        x = torch.empty(n, dtype=torch.float16, device="cuda")
        y = ops._triton_softmax(x, 0, torch.float16, log)
        ops._triton_softmax_backward(y, y, 0, torch.float16, log)
        ops._triton_logsumexp(x, 0, False)
        ops._triton_logsumexp_backward(
            torch.empty(1, dtype=torch.float16, device="cuda"),
            x,
            torch.empty(1, dtype=torch.float64, device="cuda"),
            0,
        )

    launches = _launch(run)
    _grids_fit(launches)
    parts = n // common.SPLIT_CHUNK
    finish = [launch for launch in launches if launch.name == "_softmax_finish_kernel"]
    assert finish and finish[0].grid == (parts,)


def test_cross_entropy_with_2_to_the_28_classes_launches_within_limits():
    def run():
        logits = torch.empty(2, 2**28, dtype=torch.bfloat16, device="cuda")
        target = torch.zeros(2, dtype=torch.int64, device="cuda")
        ops._triton_cross_entropy(logits, target, None, True)
        terms = torch.empty(2, 5, dtype=torch.float32, device="cuda")
        ops._triton_cross_entropy_backward(logits, target, None, terms)

    _grids_fit(_launch(run))


def test_more_programs_than_cuda_allows_is_a_clear_error():
    assert common.grid(MAX_PROGRAMS) == (MAX_PROGRAMS,)
    with pytest.raises(RuntimeError, match="grid limit"):
        common.grid(MAX_PROGRAMS + 1)


def test_the_split_path_merges_each_rows_parts_once():
    """One program per row merges the row's part states; the programs that normalise read
    only the merged per-row state (not every part again: parts**2 reads per row)."""
    rows, n = 3, 5 * common.SPLIT_CHUNK + 7
    parts = 6

    def run():
        x = torch.empty(rows, n, dtype=torch.float32, device="cuda")
        y = ops._triton_softmax(x, 1, torch.float32, False)
        ops._triton_softmax_backward(y, y, 1, torch.float32, False)
        ops._triton_logsumexp(x, 1, False)

    by_name = {}
    for launch in _launch(run):
        by_name.setdefault(launch.name, []).append(launch)
    for name in ("_row_parts_kernel", "_softmax_finish_kernel", "_bwd_parts_kernel"):
        assert all(launch.grid == (rows * parts,) for launch in by_name[name]), name
    for name in ("_merge_parts_kernel", "_sum_parts_kernel"):
        for launch in by_name[name]:
            assert launch.grid == (rows,), name
            assert (rows * parts,) in launch.shapes and (rows,) in launch.shapes, launch.shapes
    for name in ("_softmax_finish_kernel", "_bwd_finish_kernel"):
        (launch,) = by_name[name]
        assert launch.grid == (rows * parts,), name
        per_row_state = [s for s in launch.shapes if s == (rows,)]
        assert per_row_state and (rows * parts,) not in launch.shapes, (name, launch.shapes)


# aten ops the fused cross-entropy's launchers may run: allocation (torch.empty) and what the
# fake-tensor machinery adds around it; any other op would be work on the data outside the
# kernels.
_ALLOCATION_OPS = {"aten::empty", "aten::empty_strided", "aten::detach", "aten::lift_fresh"}


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_the_fused_cross_entropy_is_two_launches_forward_and_one_backward(reduction, weighted):
    """cross_entropy_loss: the row kernel (with its epilogue) alone for "none", then one
    single-program reduction for "mean"/"sum"; cross_entropy_loss_backward: one launch. No
    other aten op than allocations (so no work on the data, and no host synchronisation),
    and every launch on the tensors' device (cuda:1 while cuda:0 is current)."""
    rows, classes = 5, 3000  # more than one tile: still one program per row forward
    device = "cuda:1"
    with FakeTensorMode(), recorded_launches() as launches:
        logits = torch.empty(rows, classes, dtype=torch.float16, device=device)
        target = torch.empty(rows, dtype=torch.int64, device=device)
        weight = torch.empty(classes, dtype=torch.float32, device=device) if weighted else None
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            loss, lse, counts = ops._triton_cross_entropy_loss(
                logits, target, weight, -100, 0.1, 1e-3, reduction
            )
        forward = list(launches)
        grad_loss = torch.empty(loss.shape, dtype=loss.dtype, device=device)
        grad_lse = torch.empty(rows, dtype=torch.float64, device=device)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof_b:
            dx = ops._triton_cross_entropy_loss_backward(
                grad_loss, grad_lse, logits, target, weight, lse, counts, -100, 0.1, 1e-3, reduction
            )
        backward = launches[len(forward) :]
    assert loss.shape == ((rows,) if reduction == "none" else ())
    assert loss.dtype == torch.float32 and lse.shape == (rows,) and counts.shape == (3,)
    assert dx.shape == logits.shape and dx.dtype == logits.dtype
    names = [launch.name for launch in forward]
    if reduction == "none":
        assert names == ["_cross_entropy_fwd_kernel"], names
    else:
        assert names == ["_cross_entropy_fwd_kernel", "_cross_entropy_reduce_kernel"], names
        assert forward[1].grid == (1,)
    assert forward[0].grid == (rows,)
    assert [launch.name for launch in backward] == ["_cross_entropy_bwd_kernel"]
    _grids_fit(launches)
    assert {launch.device for launch in launches} == {torch.device(device)}
    for p in (prof, prof_b):
        aten = {e.name for e in p.events() if e.name.startswith("aten::")}
        assert aten <= _ALLOCATION_OPS, aten - _ALLOCATION_OPS


def test_the_fused_cross_entropy_with_2_to_the_28_classes_launches_within_limits():
    def run():
        logits = torch.empty(2, 2**28, dtype=torch.bfloat16, device="cuda")
        target = torch.zeros(2, dtype=torch.int64, device="cuda")
        weight = torch.empty(2**28, dtype=torch.float32, device="cuda")
        for reduction in ("none", "mean"):
            loss, lse, counts = ops._triton_cross_entropy_loss(
                logits, target, weight, -100, 0.1, 1e-3, reduction
            )
            ops._triton_cross_entropy_loss_backward(
                loss, None, logits, target, weight, lse, counts, -100, 0.1, 1e-3, reduction
            )

    _grids_fit(_launch(run))
