"""Splitting an FFN's neurons into E equal-size experts: the partition step of MoEfication.

Two ways, both from Zhang et al. (2022), "MoEfication: Transformer Feed-forward Layers are
Mixtures of Experts":

* **Parameter clustering** (:func:`kmeans_partition`): neurons whose input weights (rows of
  ``W_up``, L2-normalised) point the same way fire on similar inputs, so balanced k-means on
  those rows groups them. EMoE (Qiu et al., 2024) builds its experts the same way.
* **Co-activation clustering** (:func:`coactivation_partition`): count on real text how often
  two neurons fire (positive pre-activation) on the same token, and cut that graph into E
  groups with few co-firings between them. MoEfication cuts it with METIS and then moves
  neurons to balance the groups; we use the spectral relaxation of the normalised cut
  (Ng, Jordan & Weiss, 2001: rows of the top-E eigenvectors of ``D^-1/2 A D^-1/2``) followed by
  the same balanced k-means, which needs no external graph partitioner.

Balanced k-means alternates centroid updates with an *equal-size* assignment. The greedy
assignment (all point-cluster pairs by distance, each point to its nearest cluster that still
has room) is fast enough for every iteration; the final assignment is the exact optimum for the
last centroids, solved as a linear assignment problem (each cluster repeated H/E times).
Measured on MiniLM (H = 1536, E = 32): one exact assignment takes ~2 s on this CPU, so it is
used once, not per iteration.

A partition is an (E, H/E) int64 tensor: row ``e`` lists the neurons of expert ``e``, sorted.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor


def check_partition(partition: Tensor, hidden: int) -> None:
    """Raise ``ValueError`` unless ``partition`` (E, H/E) uses every neuron of ``range(hidden)`` once."""
    flat = partition.flatten()
    if flat.numel() != hidden or not torch.equal(flat.sort().values, torch.arange(hidden, device=flat.device)):
        raise ValueError(f"partition {tuple(partition.shape)} is not a disjoint cover of {hidden} neurons")


def labels_to_partition(labels: Tensor, num_groups: int) -> Tensor:
    """(H,) group labels with equal group sizes -> (E, H/E) sorted neuron indices per group."""
    counts = torch.bincount(labels, minlength=num_groups)
    if not bool((counts == counts[0]).all()):
        raise ValueError(f"groups are not of equal size: {counts.tolist()}")
    order = torch.argsort(labels * labels.numel() + torch.arange(labels.numel()))  # by group, then index
    return order.reshape(num_groups, -1)


def partition_to_labels(partition: Tensor) -> Tensor:
    """(E, H/E) partition -> (H,) expert of every neuron."""
    labels = torch.empty(partition.numel(), dtype=torch.long)
    labels[partition.flatten().cpu()] = torch.arange(partition.shape[0]).repeat_interleave(partition.shape[1])
    return labels


def _greedy_balanced(dist: Tensor, size: int) -> Tensor:
    """Each point to its nearest cluster with room, pairs taken in increasing distance. (H, E) -> (H,)."""
    h, e = dist.shape
    order = torch.argsort(dist.flatten()).tolist()
    labels = [-1] * h
    room = [size] * e
    left = h
    for flat in order:
        i, c = divmod(flat, e)
        if labels[i] < 0 and room[c] > 0:
            labels[i], room[c] = c, room[c] - 1
            left -= 1
            if left == 0:
                break
    return torch.tensor(labels)


def _exact_balanced(dist: Tensor, size: int) -> Tensor:
    """Equal-size assignment of minimum total distance (Hungarian / LAPJV on repeated columns)."""
    cost = dist.double().repeat_interleave(size, dim=1).numpy()
    rows, cols = linear_sum_assignment(cost)
    labels = torch.empty(dist.shape[0], dtype=torch.long)
    labels[torch.from_numpy(rows)] = torch.from_numpy(cols) // size
    return labels


def balanced_kmeans(points: Tensor, num_groups: int, *, iters: int = 20, seed: int = 0) -> Tensor:
    """Equal-size k-means of ``points`` (H, F): (H,) labels, each group with H / E points.

    k-means++ initialisation (seeded), greedy balanced assignments until they stop changing
    (at most ``iters``; MoEfication's balanced k-means runs 20), then one exact balanced
    assignment to the final centroids.
    """
    h = points.shape[0]
    if h % num_groups:
        raise ValueError(f"balanced_kmeans: {h} points do not split into {num_groups} equal groups")
    size = h // num_groups
    x = points.double().cpu()
    g = torch.Generator().manual_seed(seed)
    centers = [x[torch.randint(h, (1,), generator=g)].squeeze(0)]
    for _ in range(1, num_groups):  # k-means++: next centre drawn proportional to squared distance
        d2 = torch.cdist(x, torch.stack(centers)).pow(2).min(1).values
        centers.append(x[torch.multinomial(d2 / d2.sum(), 1, generator=g)].squeeze(0))
    c = torch.stack(centers)
    labels = torch.full((h,), -1, dtype=torch.long)
    for _ in range(iters):
        new = _greedy_balanced(torch.cdist(x, c).pow(2), size)
        if torch.equal(new, labels):
            break
        labels = new
        c = torch.zeros_like(c).index_add_(0, labels, x) / size
    return _exact_balanced(torch.cdist(x, c).pow(2), size)


def kmeans_partition(w_up: Tensor, num_experts: int, seed: int = 0) -> Tensor:
    """MoEfication's parameter clustering: balanced k-means on the L2-normalised rows of ``W_up`` (H, D)."""
    rows = torch.nn.functional.normalize(w_up.detach().double(), dim=1)
    return labels_to_partition(balanced_kmeans(rows, num_experts, seed=seed), num_experts)


def coactivation_counts(fired: Tensor) -> Tensor:
    """(H, H) float64: on how many tokens neurons i and j both fired; zero diagonal.

    Args:
        fired: (N, H) bool, neuron fired (positive pre-activation) on token n.
    """
    f = fired.double()
    a = f.t() @ f
    a.fill_diagonal_(0.0)
    return a


def spectral_embedding(adj: Tensor, dims: int) -> Tensor:
    """(H, dims) rows of the top eigenvectors of ``D^-1/2 A D^-1/2``, each row L2-normalised (NJW)."""
    deg = adj.sum(1).clamp_min(1e-12)
    inv = deg.rsqrt()
    norm = inv[:, None] * adj * inv[None, :]
    _, vecs = torch.linalg.eigh(norm)  # ascending eigenvalues
    return torch.nn.functional.normalize(vecs[:, -dims:], dim=1)


def coactivation_partition(fired: Tensor, num_experts: int, seed: int = 0) -> Tensor:
    """Co-activation clustering: balanced spectral partition of the co-firing graph of ``fired`` (N, H)."""
    emb = spectral_embedding(coactivation_counts(fired), num_experts)
    return labels_to_partition(balanced_kmeans(emb, num_experts, seed=seed), num_experts)


def random_partition(hidden: int, num_experts: int, seed: int = 0) -> Tensor:
    """A uniformly random equal-size partition (the baseline both methods must beat)."""
    perm = torch.randperm(hidden, generator=torch.Generator().manual_seed(seed))
    return perm.reshape(num_experts, -1).sort(dim=1).values
