"""The one balanced k-means and its partition helpers: equal groups, seeded, exact on planted
clusters, optimal final assignment, and exact correlation / co-activation statistics."""

import itertools

import pytest
import torch

from brickwork.analysis.clustering import (
    balanced_kmeans,
    check_partition,
    cluster_units,
    coactivation_counts,
    coactivation_partition,
    correlation,
    exact_balanced_assignment,
    greedy_balanced_assignment,
    kmeans_partition,
    labels_to_partition,
    partition_to_labels,
    random_partition,
)


def _planted(groups: int, size: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Points around ``groups`` far-apart centres, shuffled; returns (points (G*size, dim), true labels)."""
    g = torch.Generator().manual_seed(seed)
    centres = 10.0 * torch.randn(groups, dim, generator=g)
    truth = torch.arange(groups).repeat_interleave(size)
    shuffle = torch.randperm(groups * size, generator=g)
    points = centres[truth] + 0.1 * torch.randn(groups * size, dim, generator=g)
    return points[shuffle], truth[shuffle]


def _same_grouping(labels: torch.Tensor, truth: torch.Tensor) -> bool:
    """True when ``labels`` equals ``truth`` up to renaming the groups."""
    pairs = set(zip(labels.tolist(), truth.tolist(), strict=True))
    return len(pairs) == len(set(labels.tolist())) == len(set(truth.tolist()))


def _cost(dist: torch.Tensor, labels: torch.Tensor) -> float:
    return float(dist[torch.arange(dist.shape[0]), labels].sum())


def test_every_group_has_exactly_n_over_k_points():
    points = torch.randn(60, 5, generator=torch.Generator().manual_seed(3)) ** 3  # skewed, uneven natural clusters
    assert torch.bincount(balanced_kmeans(points, 6), minlength=6).tolist() == [10] * 6
    with pytest.raises(ValueError, match="equal groups"):
        balanced_kmeans(points, 7)


def test_same_seed_same_labels():
    points = torch.randn(48, 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(balanced_kmeans(points, 4, seed=5), balanced_kmeans(points, 4, seed=5))
    assert torch.equal(kmeans_partition(points, 4, seed=2), kmeans_partition(points, 4, seed=2))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_planted_clusters_exactly(seed):
    points, truth = _planted(groups=4, size=8, dim=6, seed=seed)
    assert _same_grouping(balanced_kmeans(points, 4, seed=seed), truth)


def test_cluster_units_groups_planted_ensembles_exactly():
    g = torch.Generator().manual_seed(0)
    sources = torch.randn(500, 4, generator=g)  # four independent ensembles of 6 units each
    truth = torch.arange(4).repeat_interleave(6)
    shuffle = torch.randperm(24, generator=g)
    acts = sources[:, truth[shuffle]] + 0.2 * torch.randn(500, 24, generator=g)
    perm = cluster_units(acts, 4)
    assert sorted(perm.tolist()) == list(range(24))
    for grp in perm.reshape(4, 6):
        assert len(set(truth[shuffle][grp].tolist())) == 1  # one ensemble per group
        assert grp.tolist() == sorted(grp.tolist())  # ascending within a group


def test_partition_and_labels_round_trip():
    labels = torch.tensor([2, 0, 1, 1, 0, 2, 2, 0, 1])
    part = labels_to_partition(labels, 3)
    assert part.tolist() == [[1, 4, 7], [2, 3, 8], [0, 5, 6]]
    assert torch.equal(partition_to_labels(part), labels)
    rand = random_partition(12, 4, seed=3)
    check_partition(rand, 12)
    assert torch.equal(labels_to_partition(partition_to_labels(rand), 4), rand)
    with pytest.raises(ValueError, match="equal size"):
        labels_to_partition(torch.tensor([0, 0, 1]), 2)
    with pytest.raises(ValueError, match="disjoint cover"):
        check_partition(torch.tensor([[0, 1], [1, 2]]), 4)


def test_exact_assignment_is_optimal_and_never_worse_than_greedy():
    # Greedy takes the cheapest pair first (point 0 -> cluster 0) and forces point 1 into its worst cluster.
    trap = torch.tensor([[0.0, 1.0], [0.1, 10.0]])
    assert greedy_balanced_assignment(trap, 1).tolist() == [0, 1]
    assert exact_balanced_assignment(trap, 1).tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        dist = torch.rand(6, 3, generator=g)
        exact, greedy = exact_balanced_assignment(dist, 2), greedy_balanced_assignment(dist, 2)
        assert torch.bincount(exact).tolist() == [2, 2, 2] and torch.bincount(greedy).tolist() == [2, 2, 2]
        brute = min(
            _cost(dist, torch.tensor(lab))
            for lab in itertools.product(range(3), repeat=6)
            if sorted(lab) == [0, 0, 1, 1, 2, 2]
        )
        assert _cost(dist, exact) == pytest.approx(brute, abs=1e-12)
        assert _cost(dist, exact) <= _cost(dist, greedy) + 1e-12


def test_correlation_is_pearson_and_constant_units_correlate_zero():
    acts = torch.randn(100, 5, generator=torch.Generator().manual_seed(0))
    acts[:, 3] = 2.0
    corr = correlation(acts)
    ref = torch.corrcoef(acts.double().t())
    keep = [0, 1, 2, 4]
    torch.testing.assert_close(corr[keep][:, keep], ref[keep][:, keep])
    assert bool((corr[3] == 0).all()) and bool((corr[:, 3] == 0).all())


def test_coactivation_counts_and_partition_of_two_disjoint_cliques():
    fired = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 1, 1]], dtype=torch.bool)
    assert coactivation_counts(fired).tolist() == [[0, 2, 1, 1], [2, 0, 0, 0], [1, 0, 0, 2], [1, 0, 2, 0]]
    # Neurons 0-3 fire together, 4-7 fire together, never across: the partition is the two cliques.
    block = torch.zeros(40, 8, dtype=torch.bool)
    block[:20, :4] = torch.rand(20, 4, generator=torch.Generator().manual_seed(0)) < 0.8
    block[20:, 4:] = torch.rand(20, 4, generator=torch.Generator().manual_seed(1)) < 0.8
    block[0, :4] = block[20, 4:] = True  # every neuron fires at least once with its clique
    part = coactivation_partition(block[:, torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])], 2)
    assert sorted(part.tolist()) == [[0, 2, 4, 6], [1, 3, 5, 7]]
