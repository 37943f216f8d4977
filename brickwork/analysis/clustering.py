"""Equal-size clustering of units (neurons, channels): the one balanced k-means of brickwork.

Two operations split a layer's units into equal groups and share this module:

* **MoEfication** (:mod:`brickwork.ops.moefy`; Zhang et al., 2022, "MoEfication: Transformer
  Feed-forward Layers are Mixtures of Experts") groups an FFN's H neurons into E experts, by
  *parameter clustering* (:func:`kmeans_partition`: neurons whose input weights, rows of ``W_up``
  L2-normalised, point the same way fire on similar inputs; EMoE, Qiu et al., 2024, builds its
  experts the same way) or by *co-activation clustering* (:func:`coactivation_partition`: count
  on real text how often two neurons fire on the same token and cut that graph into E groups
  with few co-firings between them). MoEfication cuts the graph with METIS and then moves
  neurons to balance the groups; so does :func:`metis_partition` (``pymetis``, the optional
  ``metis`` extra), following their code (``adj.py``, ``trans_gp.py``): edges weaker than the
  first non-zero decile of the co-firing counts are dropped and the rest given integer weights
  in units of that decile, METIS cuts the graph into E parts (its default 3 % imbalance), and
  the surplus neurons of oversized parts, drawn at random, fill the undersized ones at random.
  Without ``pymetis`` the fallback is the spectral relaxation of the normalised cut (Ng, Jordan
  & Weiss, 2001: rows of the top-E eigenvectors of ``D^-1/2 A D^-1/2``) followed by the same
  balanced k-means (:func:`spectral_partition`), which needs no external graph partitioner.
* **Sparsification** (:mod:`brickwork.ops.sparsify`, G2GNet) groups units into neuronal
  *ensembles*, units that are active together (:func:`cluster_units`): each unit is described by
  its correlation profile (its row of the D x D correlation matrix, L2-normalised, so squared
  distance is cosine dissimilarity) and the profiles are clustered.

Balanced k-means alternates centroid updates with an *equal-size* assignment (a grouped layer
needs equal group widths). The greedy assignment (all point-cluster pairs by distance, each
point to its nearest cluster that still has room) is fast enough for every iteration; the final
assignment is the exact optimum for the last centroids, a linear assignment problem (each
cluster repeated H/E times), which the greedy one only approximates
(:func:`exact_balanced_assignment` never costs more). Measured on MiniLM (H = 1536, E = 32):
one exact assignment takes ~2 s on this CPU, so it is used once, not per iteration.

Sparsification used to have its own spherical k-means (random initial centroids, greedy
assignments only); it now uses this one. Measured on ``configs/sparse/sparsify-mnist5k.yaml``
(3 seeds): kept weight mass 0.544 -> 0.560, validation accuracy right after the conversion
0.844 +- 0.031 -> 0.849 +- 0.016, test accuracy after fine-tuning 0.950 -> 0.952.

A *partition* is an (E, H/E) int64 tensor: row ``e`` lists the units of group ``e``, sorted.
*Labels* are the (H,) group of every unit; :func:`labels_to_partition` and
:func:`partition_to_labels` convert between them.
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

# How the co-activation graph is cut: METIS (MoEfication's) or the spectral relaxation.
CutMethod = Literal["metis", "spectral"]


def check_partition(partition: Tensor, hidden: int) -> None:
    """Raise ``ValueError`` unless ``partition`` (E, H/E) uses every unit of ``range(hidden)`` once."""
    flat = partition.flatten()
    if flat.numel() != hidden or not torch.equal(flat.sort().values, torch.arange(hidden, device=flat.device)):
        raise ValueError(f"partition {tuple(partition.shape)} is not a disjoint cover of {hidden} units")


def labels_to_partition(labels: Tensor, num_groups: int) -> Tensor:
    """(H,) group labels with equal group sizes -> (E, H/E) sorted unit indices per group.

    Flattened, the partition is a unit order that makes every group contiguous (group by group,
    ascending within a group), the permutation a grouped layer absorbs.
    """
    counts = torch.bincount(labels, minlength=num_groups)
    if counts.numel() != num_groups or not bool((counts == counts[0]).all()):
        raise ValueError(f"groups are not of equal size: {counts.tolist()}")
    order = torch.argsort(labels * labels.numel() + torch.arange(labels.numel()))  # by group, then index
    return order.reshape(num_groups, -1)


def partition_to_labels(partition: Tensor) -> Tensor:
    """(E, H/E) partition -> (H,) group of every unit."""
    labels = torch.empty(partition.numel(), dtype=torch.long)
    labels[partition.flatten().cpu()] = torch.arange(partition.shape[0]).repeat_interleave(partition.shape[1])
    return labels


def greedy_balanced_assignment(dist: Tensor, size: int) -> Tensor:
    """Each point to its nearest cluster with room, (point, cluster) pairs taken in increasing distance.

    Args:
        dist: (H, E) distance of every point to every cluster.
        size: room per cluster (H = E * size).

    Returns:
        (H,) long labels, each cluster used exactly ``size`` times.
    """
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
    return torch.tensor(labels, dtype=torch.long)


def exact_balanced_assignment(dist: Tensor, size: int) -> Tensor:
    """Equal-size assignment of minimum total distance (LAPJV on ``size`` copies of every cluster).

    Args:
        dist: (H, E) distance of every point to every cluster.
        size: room per cluster (H = E * size).

    Returns:
        (H,) long labels, each cluster used exactly ``size`` times.
    """
    cost = dist.double().cpu().repeat_interleave(size, dim=1).numpy()
    from scipy.optimize import linear_sum_assignment  # here: scipy is slow to import

    rows, cols = linear_sum_assignment(cost)
    labels = torch.empty(dist.shape[0], dtype=torch.long)
    labels[torch.from_numpy(rows)] = torch.from_numpy(cols) // size
    return labels


def balanced_kmeans(points: Tensor, num_groups: int, *, iters: int = 20, seed: int = 0) -> Tensor:
    """Equal-size k-means of ``points`` (H, F) in squared Euclidean distance.

    k-means++ initialisation (seeded), greedy balanced assignments until they stop changing
    (at most ``iters``; MoEfication's balanced k-means runs 20), then one exact balanced
    assignment to the final centroids.

    Returns:
        (H,) long labels, each of the E groups with exactly H / E points.
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
        new = greedy_balanced_assignment(torch.cdist(x, c).pow(2), size)
        if torch.equal(new, labels):
            break
        labels = new
        c = torch.zeros_like(c).index_add_(0, labels, x) / size
    return exact_balanced_assignment(torch.cdist(x, c).pow(2), size)


def kmeans_partition(w_up: Tensor, num_experts: int, seed: int = 0) -> Tensor:
    """MoEfication's parameter clustering: (E, H/E) balanced k-means of the L2-normalised rows of ``W_up`` (H, D)."""
    rows = F.normalize(w_up.detach().double(), dim=1)
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
    """(H, dims) rows of the top eigenvectors of ``D^-1/2 A D^-1/2`` for ``adj`` (H, H), rows L2-normalised (NJW)."""
    deg = adj.sum(1).clamp_min(1e-12)
    inv = deg.rsqrt()
    norm = inv[:, None] * adj * inv[None, :]
    _, vecs = torch.linalg.eigh(norm)  # ascending eigenvalues
    return F.normalize(vecs[:, -dims:], dim=1)


def spectral_partition(adj: Tensor, num_experts: int, seed: int = 0) -> Tensor:
    """(E, H/E) balanced k-means of the graph ``adj`` (H, H)'s spectral embedding: the METIS fallback."""
    emb = spectral_embedding(adj, num_experts)
    return labels_to_partition(balanced_kmeans(emb, num_experts, seed=seed), num_experts)


def metis_available() -> bool:
    """Whether ``pymetis`` is installed (``pip install 'brickwork[metis]'``)."""
    return importlib.util.find_spec("pymetis") is not None


def metis_labels(adj: Tensor, num_experts: int, seed: int = 0) -> Tensor:
    """(H,) METIS k-way parts of the weighted graph ``adj`` (H, H), edges thresholded as MoEfication's ``adj.py``.

    The threshold is the first non-zero of the 10th, 20th, ... percentiles of all entries;
    entries at or above it (times 0.99, as theirs) become edges of weight ``floor(a / t)``.
    The parts are METIS's (default imbalance tolerance 1.03), not yet equal in size.
    """
    import pymetis  # optional dependency: the `metis` extra

    a = adj.detach().double().cpu().clone()
    a.fill_diagonal_(0.0)
    flat = a.reshape(-1)
    threshold = 0.0
    for pct in range(10, 101, 10):
        threshold = float(torch.quantile(flat, pct / 100.0))
        if threshold > 0:
            break
    if threshold <= 0:
        raise ValueError("metis_partition: the co-activation graph has no edges (no two units ever fired together)")
    weights = torch.floor(a / (threshold * 0.99))
    xadj, adjncy, eweights = [0], [], []
    for row in weights:
        nbrs = torch.nonzero(row >= 1).reshape(-1)
        adjncy += nbrs.tolist()
        eweights += row[nbrs].long().tolist()
        xadj.append(len(adjncy))
    graph = pymetis.CSRAdjacency(xadj, adjncy)
    _, parts = pymetis.part_graph(num_experts, graph, eweights=eweights, options=pymetis.Options(seed=seed))
    return torch.tensor(parts, dtype=torch.long)


def balance_labels(labels: Tensor, num_experts: int, seed: int = 0) -> Tensor:
    """(H,) labels moved to equal parts of H/E as MoEfication's ``trans_gp.py`` does.

    Each part larger than H/E keeps a random H/E of its units; the surplus, shuffled, fills the
    parts that are short, in order of part index.
    """
    hidden = labels.numel()
    size = hidden // num_experts
    if size * num_experts != hidden:
        raise ValueError(f"balance_labels: {hidden} units do not split into {num_experts} equal parts")
    gen = torch.Generator().manual_seed(seed)
    members = [torch.nonzero(labels == e).reshape(-1) for e in range(num_experts)]
    surplus: list[Tensor] = []
    for e, m in enumerate(members):
        if len(m) > size:
            m = m[torch.randperm(len(m), generator=gen)]
            members[e], extra = m[:size], m[size:]
            surplus.append(extra)
    pool = torch.cat(surplus) if surplus else torch.empty(0, dtype=torch.long)
    pool = pool[torch.randperm(len(pool), generator=gen)]
    out = labels.clone()
    for e, m in enumerate(members):
        need = size - len(m)
        if need > 0:
            out[pool[:need]] = e
            pool = pool[need:]
    return out


def metis_partition(adj: Tensor, num_experts: int, seed: int = 0) -> Tensor:
    """(E, H/E): MoEfication's co-activation split: METIS k-way cut of ``adj`` (H, H), then balanced."""
    return labels_to_partition(balance_labels(metis_labels(adj, num_experts, seed), num_experts, seed), num_experts)


def coactivation_partition(fired: Tensor, num_experts: int, seed: int = 0, method: CutMethod = "metis") -> Tensor:
    """Co-activation clustering: (E, H/E) balanced partition of the co-firing graph of ``fired`` (N, H).

    Args:
        fired: (N, H) bool, neuron fired on token n.
        num_experts: E.
        seed: METIS's seed and the balancing draw (or the k-means initialisation).
        method: ``"metis"`` (MoEfication's; falls back to ``"spectral"`` with a warning when
            ``pymetis`` is not installed) or ``"spectral"``.
    """
    adj = coactivation_counts(fired)
    if method == "metis":
        if metis_available():
            return metis_partition(adj, num_experts, seed)
        warnings.warn(
            "pymetis is not installed (pip install 'brickwork[metis]'): co-activation clustering falls back to "
            "the spectral cut",
            stacklevel=2,
        )
    return spectral_partition(adj, num_experts, seed)


def random_partition(hidden: int, num_experts: int, seed: int = 0) -> Tensor:
    """A uniformly random (E, H/E) equal-size partition (the baseline both methods must beat)."""
    perm = torch.randperm(hidden, generator=torch.Generator().manual_seed(seed))
    return perm.reshape(num_experts, -1).sort(dim=1).values


def correlation(acts: Tensor) -> Tensor:
    """(D, D) Pearson correlation of the columns of ``acts`` (N, D); a constant unit correlates 0."""
    a = acts.double() - acts.double().mean(0)
    std = a.square().mean(0).sqrt()
    z = a / std.clamp_min(1e-12)
    z[:, std <= 1e-12] = 0.0
    return z.t() @ z / acts.shape[0]


def cluster_units(acts: Tensor, groups: int, seed: int = 0) -> Tensor:
    """A permutation of the D units putting units that are active together in the same group.

    Args:
        acts: (N, D) activations of the units on N samples.
        groups: number of equal groups G.
        seed: seed of the k-means initialisation.

    Returns:
        (D,) long ``perm``: group g is units ``perm[g * D/G : (g + 1) * D/G]`` (ascending within a group).
    """
    profiles = F.normalize(correlation(acts), dim=1)  # a constant unit's zero row stays zero
    return labels_to_partition(balanced_kmeans(profiles, groups, seed=seed), groups).flatten()
