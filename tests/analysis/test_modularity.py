"""Newman modularity, random baselines and routing divergence on graphs with known answers."""

import math

import pytest
import torch

from brickwork.analysis.clustering import coactivation_counts, coactivation_partition, partition_to_labels
from brickwork.analysis.modularity import js_divergence, layer_modularity, newman_modularity, random_modularity


def two_cliques(n: int = 8) -> torch.Tensor:
    adj = torch.zeros(2 * n, 2 * n, dtype=torch.float64)
    adj[:n, :n] = 1
    adj[n:, n:] = 1
    adj.fill_diagonal_(0)
    return adj


def test_modularity_of_two_disjoint_cliques():
    adj = two_cliques()
    planted = torch.tensor([0] * 8 + [1] * 8)
    assert newman_modularity(adj, planted) == pytest.approx(0.5)  # two equal disconnected groups: Q = 1/2
    assert newman_modularity(adj, torch.zeros(16, dtype=torch.long)) == pytest.approx(0.0)  # one group
    mean, std = random_modularity(adj, 2, trials=30)
    assert mean < 0.1 and std > 0


def test_coactivation_clustering_finds_neurons_that_fire_together():
    g = torch.Generator().manual_seed(0)
    topic = torch.randint(0, 4, (400,), generator=g)  # each token activates one of 4 neuron groups
    fired = torch.zeros(400, 32, dtype=torch.bool)
    for t in range(4):
        fired[topic == t, t * 8 : (t + 1) * 8] = torch.rand(int((topic == t).sum()), 8, generator=g) > 0.3
    part = coactivation_partition(fired, 4)
    assert sorted(sorted(row.tolist()) for row in part) == [list(range(t * 8, (t + 1) * 8)) for t in range(4)]
    stats = layer_modularity(fired, {"coactivation": part})
    assert stats["coactivation"] > stats["random"] + 10 * stats["random_std"]
    assert newman_modularity(coactivation_counts(fired), partition_to_labels(part)) == stats["coactivation"]


def test_js_divergence():
    p = torch.tensor([1.0, 0.0])
    assert js_divergence(p, p) == pytest.approx(0.0)
    assert js_divergence(p, torch.tensor([0.0, 1.0])) == pytest.approx(math.log(2))
