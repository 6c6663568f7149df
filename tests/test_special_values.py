"""Special values, empty dims and 0-dim tensors: row by row as torch, and rows independent."""

from __future__ import annotations

import pytest
import torch

import stablekernels as sk

from .conftest import poison_compare

INF, NAN = float("inf"), float("nan")

# The table of the numerics contract, one row per case.
SPECIAL_ROWS = {
    "all -inf": [-INF, -INF, -INF, -INF],
    "one +inf": [INF, 0.0, 1.0, -2.0],
    "two +inf": [INF, INF, 1.0, 0.0],
    "+inf and -inf": [INF, -INF, 0.0, 1.0],
    "one nan": [NAN, 0.0, 1.0, 2.0],
    "nan and +inf": [-INF, NAN, INF, 0.0],
    "-inf among finite": [-INF, 0.0, 1.0, -INF],
    "ties at the max": [3.0, 3.0, 3.0, -1.0],
    "largest float32": [3.4e38, -3.4e38, 3.4e38, 0.0],
    "finite": [0.5, -1.5, 2.0, 0.25],
}


def special_matrix(dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(list(SPECIAL_ROWS.values()), dtype=torch.float32).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["softmax", "log_softmax", "logsumexp"])
def test_special_value_table_matches_torch_row_by_row(backend, name, dtype):
    x = special_matrix(dtype)
    ours = getattr(sk, name)(x, 1, backend=backend)
    # For halves, torch's fp32 kernel on the same values is the truth.
    theirs = getattr(torch, name)(x if x.itemsize >= 4 else x.float(), 1).to(dtype)
    for i, row in enumerate(SPECIAL_ROWS):
        torch.testing.assert_close(ours[i], theirs[i], equal_nan=True, msg=f"row {row!r}")


@pytest.mark.parametrize("name", ["softmax", "log_softmax", "logsumexp"])
def test_special_values_along_dim_0(backend, name):
    x = special_matrix().t()
    ours = getattr(sk, name)(x, 0, backend=backend)
    theirs = getattr(torch, name)(x, 0)
    torch.testing.assert_close(ours, theirs, equal_nan=True)


@pytest.mark.parametrize("name", ["softmax", "log_softmax", "logsumexp"])
def test_a_bad_row_never_changes_another_row(backend, name):
    good = torch.randn(6, 257) * 4
    bad = torch.tensor(list(SPECIAL_ROWS.values())[:-1]).repeat(1, 65)[:, :257]
    mixed = torch.cat([good[:3], bad, good[3:]])
    alone = getattr(sk, name)(good, 1, backend=backend)
    together = getattr(sk, name)(mixed, 1, backend=backend)
    together_good = torch.cat([together[:3], together[3 + len(bad) :]])
    assert torch.equal(alone, together_good)


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@pytest.mark.parametrize(
    "shape,dim", [((3, 0), 1), ((0, 4), 1), ((0, 4), 0), ((0,), 0), ((2, 0, 3), 1), ((2, 0, 3), 2)]
)
def test_softmax_of_empty_tensors(backend, name, shape, dim):
    x = torch.randn(shape)
    ours = getattr(sk, name)(x, dim, backend=backend)
    theirs = getattr(torch, name)(x, dim)
    poison_compare(ours, theirs)


@pytest.mark.parametrize("keepdim", [False, True])
@pytest.mark.parametrize(
    "shape,dim", [((3, 0), 1), ((0, 4), 1), ((0, 4), 0), ((0,), 0), ((2, 0, 3), 1), ((2, 0, 3), 2)]
)
def test_logsumexp_of_empty_dims_is_minus_inf(backend, shape, dim, keepdim):
    x = torch.randn(shape)
    ours = sk.logsumexp(x, dim, keepdim, backend=backend)
    theirs = torch.logsumexp(x, dim, keepdim)
    poison_compare(ours, theirs)
    if x.shape[dim] == 0 and ours.numel():
        assert (ours == -INF).all()


@pytest.mark.parametrize("dim", [0, -1])
@pytest.mark.parametrize("value", [2.5, -INF, INF, NAN])
def test_zero_dim_tensors(backend, dim, value):
    x = torch.tensor(value)
    for name in ("softmax", "log_softmax", "logsumexp"):
        ours = getattr(sk, name)(x, dim, backend=backend)
        theirs = getattr(torch, name)(x, dim)
        assert ours.shape == torch.Size([])
        poison_compare(ours, theirs)
    poison_compare(sk.logsumexp(x, dim, True, backend=backend), torch.logsumexp(x, dim, True))
    poison_compare(sk.logsumexp(x, (), backend=backend), torch.logsumexp(x, ()))


def test_single_element_rows(backend):
    x = torch.randn(5, 1)
    poison_compare(sk.softmax(x, 1, backend=backend), torch.ones(5, 1))
    poison_compare(sk.log_softmax(x, 1, backend=backend), torch.zeros(5, 1))
    poison_compare(sk.logsumexp(x, 1, backend=backend), x[:, 0])


def _long_row(n=300000):
    return torch.randn(n) * 3


LONG_ROW_CASES = {
    # Special values far apart in long rows land in different chunks and, for a single row,
    # in segments computed by different threads.
    "+inf late": lambda r: r.index_fill_(0, torch.tensor([250000]), INF),
    "nan late": lambda r: r.index_fill_(0, torch.tensor([299999]), NAN),
    "-inf early half": lambda r: r.index_fill_(0, torch.arange(0, 150000), -INF),
    "all -inf": lambda r: r.fill_(-INF),
    "max in the last chunk": lambda r: r.index_fill_(0, torch.tensor([299990]), 50.0),
    "ties across chunks": lambda r: r.index_fill_(0, torch.tensor([5, 100000, 290000]), 40.0),
}


@pytest.mark.parametrize("case", list(LONG_ROW_CASES))
@pytest.mark.parametrize("rows", [1, 3])
def test_special_values_in_long_rows(backend, case, rows):
    x = torch.stack([LONG_ROW_CASES[case](_long_row()) for _ in range(rows)])
    for name in ("softmax", "log_softmax", "logsumexp"):
        ours = getattr(sk, name)(x, -1, backend=backend)
        theirs = getattr(torch, name)(x.double(), -1).float()
        torch.testing.assert_close(
            ours, theirs, equal_nan=True, atol=1e-6, rtol=1e-5, msg=f"{name} {case}"
        )
