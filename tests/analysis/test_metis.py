"""MoEfication's METIS split of the co-activation graph: balanced parts, planted groups recovered."""

import pytest
import torch

from brickwork.analysis.clustering import (
    balance_labels,
    coactivation_counts,
    coactivation_partition,
    metis_available,
    metis_labels,
    metis_partition,
    partition_to_labels,
    spectral_partition,
)

needs_metis = pytest.mark.skipif(not metis_available(), reason="pymetis not installed (pip install 'brickwork[metis]')")


def _planted_firing(groups: int, size: int, tokens: int = 400, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, groups*size) firing where each token lights one shuffled group (plus 2 % noise); true labels."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.arange(groups).repeat_interleave(size)[torch.randperm(groups * size, generator=g)]
    which = torch.randint(0, groups, (tokens,), generator=g)
    fired = truth[None, :] == which[:, None]
    fired |= torch.rand(fired.shape, generator=g) < 0.02
    return fired, truth


def _same_grouping(labels: torch.Tensor, truth: torch.Tensor) -> bool:
    return all(len(set(labels[truth == t].tolist())) == 1 for t in truth.unique())


def test_balance_labels_gives_equal_parts_and_moves_only_surplus() -> None:
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 2, 2, 3, 3, 3, 1])  # sizes 5, 2, 2, 3 -> 3 each
    out = balance_labels(labels, 4, seed=1)
    assert torch.bincount(out, minlength=4).tolist() == [3, 3, 3, 3]
    moved = out != labels
    assert int(moved.sum()) == 2 and bool((labels[moved] == 0).all())  # only part 0's surplus moves
    kept = ~moved
    assert torch.equal(out[kept], labels[kept])


@needs_metis
def test_metis_partition_is_balanced_and_recovers_planted_groups() -> None:
    fired, truth = _planted_firing(4, 12)
    adj = coactivation_counts(fired)
    raw = metis_labels(adj, 4, seed=0)
    assert _same_grouping(raw, truth)  # METIS cuts along the planted groups
    part = metis_partition(adj, 4, seed=0)
    assert part.shape == (4, 12)  # balanced: equal parts
    assert sorted(part.reshape(-1).tolist()) == list(range(48))
    assert _same_grouping(partition_to_labels(part), truth)
    assert torch.equal(part, coactivation_partition(fired, 4, seed=0))  # the default cut is METIS
    assert torch.equal(part, metis_partition(adj, 4, seed=0))  # seeded: the same again


@needs_metis
def test_metis_balances_a_lopsided_graph() -> None:
    # Planted groups of 20 and 4 units; E = 2 parts of 12: METIS's parts need the balancing step.
    g = torch.Generator().manual_seed(0)
    truth = torch.tensor([0] * 20 + [1] * 4)
    which = torch.randint(0, 2, (300,), generator=g)
    fired = (truth[None, :] == which[:, None]) | (torch.rand(300, 24, generator=g) < 0.05)
    part = metis_partition(coactivation_counts(fired), 2, seed=0)
    assert part.shape == (2, 12)
    assert sorted(part.reshape(-1).tolist()) == list(range(24))


def test_spectral_cut_is_the_fallback_and_balanced(monkeypatch: pytest.MonkeyPatch) -> None:
    fired, truth = _planted_firing(4, 12)
    import brickwork.analysis.clustering as clustering

    monkeypatch.setattr(clustering, "metis_available", lambda: False)
    with pytest.warns(UserWarning, match="pymetis is not installed"):
        part = coactivation_partition(fired, 4, seed=0)
    assert torch.equal(part, spectral_partition(coactivation_counts(fired), 4, seed=0))
    assert part.shape == (4, 12) and _same_grouping(partition_to_labels(part), truth)
