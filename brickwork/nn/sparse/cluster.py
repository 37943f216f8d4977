"""Units clustered into equal-size groups by the correlation of their activations.

G2GNet's groups are neuronal *ensembles*: units that are active together. Given activations
of D units on data, each unit is described by its correlation profile (its row of the D x D
correlation matrix), and the profiles are clustered by k-means on cosine similarity with
equal cluster sizes (a group-connected layer needs equal group widths). The balanced
assignment is greedy: (unit, cluster) pairs in decreasing similarity, each unit going to its
best cluster that still has room.
"""

from __future__ import annotations

import torch
from torch import Tensor


def correlation(acts: Tensor) -> Tensor:
    """(D, D) Pearson correlation of the columns of ``acts`` (N, D); constant units correlate 0."""
    a = acts.double() - acts.double().mean(0)
    std = a.square().mean(0).sqrt()
    z = a / std.clamp_min(1e-12)
    z[:, std <= 1e-12] = 0.0
    return (z.t() @ z / acts.shape[0]).float()


def _balanced_assign(sim: Tensor, capacity: int) -> Tensor:
    """Labels (D,) from similarities (D, G), at most ``capacity`` units per cluster."""
    d, g = sim.shape
    order = torch.argsort(sim.reshape(-1), descending=True, stable=True).tolist()
    labels = [-1] * d
    room = [capacity] * g
    left = d
    for flat in order:
        unit, cluster = divmod(flat, g)
        if labels[unit] < 0 and room[cluster] > 0:
            labels[unit] = cluster
            room[cluster] -= 1
            left -= 1
            if left == 0:
                break
    return torch.tensor(labels, dtype=torch.long)


def balanced_kmeans(features: Tensor, groups: int, iters: int = 20, seed: int = 0) -> Tensor:
    """Equal-size k-means on the rows of ``features`` (D, F) by cosine similarity.

    Returns:
        (D,) long cluster label of each row; each label used exactly D / groups times.
    """
    d = features.shape[0]
    if d % groups:
        raise ValueError(f"balanced_kmeans: {d} units do not split into {groups} equal groups")
    x = torch.nn.functional.normalize(features.float(), dim=1)
    gen = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(d, generator=gen)[:groups]]
    labels = torch.full((d,), -1, dtype=torch.long)
    for _ in range(iters):
        new = _balanced_assign(x @ centroids.t(), d // groups)
        if torch.equal(new, labels):
            break
        labels = new
        sums = torch.zeros(groups, x.shape[1]).index_add_(0, labels, x)
        centroids = torch.nn.functional.normalize(sums, dim=1)
    return labels


def cluster_units(acts: Tensor, groups: int, seed: int = 0) -> Tensor:
    """A permutation of the D units putting correlated units in the same group.

    Args:
        acts: (N, D) activations of the units on N samples.
        groups: number of equal groups G.
        seed: seed of the k-means initialisation.

    Returns:
        (D,) long ``perm``: group g is units ``perm[g * D/G : (g + 1) * D/G]`` (ascending within a group).
    """
    labels = balanced_kmeans(correlation(acts), groups, seed=seed)
    return torch.argsort(labels * acts.shape[1] + torch.arange(acts.shape[1]))
