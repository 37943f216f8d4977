"""Pure functions of expert-parallel dispatch: splits and the rank-major -> expert-major permutation."""

from __future__ import annotations

import pytest
import torch

from brickwork.distributed.expert_dispatch import (
    check_expert_split,
    expert_major_order,
    inverse_permutation,
    rank_splits,
)
from brickwork.errors import BrickworkError


def _tags(recv: torch.Tensor) -> torch.Tensor:
    """(R, 2) (source rank, local expert) of each received row, in source-rank-major order."""
    p, e_l = recv.shape
    rows = [(q, j) for q in range(p) for j in range(e_l) for _ in range(int(recv[q, j]))]
    return torch.tensor(rows, dtype=torch.long).reshape(-1, 2)


@pytest.mark.parametrize(
    "recv",
    [
        torch.zeros(2, 3, dtype=torch.long),  # zero tokens anywhere
        torch.tensor([[3, 0, 2]]),  # a single rank: the order is the identity
        torch.tensor([[0, 7, 0], [1, 0, 0], [0, 0, 0], [4, 2, 9]]),  # skewed, a rank sends nothing
        torch.randint(0, 5, (4, 2), generator=torch.Generator().manual_seed(3)),
    ],
)
def test_expert_major_order_is_a_permutation_grouping_rows_by_expert_then_rank(recv):
    order, local_counts = expert_major_order(recv)
    tags = _tags(recv)
    n = int(recv.sum())
    assert order.shape == (n,) and torch.equal(order.sort().values, torch.arange(n))
    assert torch.equal(local_counts, recv.sum(0))
    moved = tags[order]
    want = sorted(tags.tolist(), key=lambda t: (t[1], t[0]))  # expert first, then source rank
    assert moved.tolist() == want
    # within one (expert, rank) block the rows keep their order (token order of the source rank)
    for j in range(recv.shape[1]):
        for q in range(recv.shape[0]):
            idx = order[(moved[:, 0] == q) & (moved[:, 1] == j)]
            assert torch.equal(idx, idx.sort().values)
    if recv.shape[0] == 1:
        assert torch.equal(order, torch.arange(n))
    x = torch.randn(n, 3, dtype=torch.float64)
    assert torch.equal(x[order][inverse_permutation(order)], x)


def test_rank_splits_sum_each_ranks_block_of_experts():
    counts = torch.tensor([2, 0, 5, 1, 0, 0])
    assert rank_splits(counts, 3).tolist() == [2, 6, 0]
    assert rank_splits(counts, 1).tolist() == [8]
    assert rank_splits(torch.zeros(4, dtype=torch.long), 2).tolist() == [0, 0]


def test_a_group_size_that_does_not_divide_the_experts_is_one_clear_error():
    assert check_expert_split(8, 4) == 2
    with pytest.raises(BrickworkError, match=r"6 experts cannot be split evenly over .* 4 ranks.*\(1, 2, 3, 6\)"):
        check_expert_split(6, 4, "models.moe")
