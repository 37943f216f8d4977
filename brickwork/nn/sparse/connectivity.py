"""Group connectivity patterns: which input groups feed each output group.

A pattern is a ``sources`` tensor (G_out, k) of input-group indices: output group ``o`` reads
the k input groups ``sources[o]`` (distinct within a row). A fixed in-degree k is what lets a
group-connected layer run as *one* batched matmul after a gather (:mod:`.kernel`); patterns
with uneven in-degree (a user's matrix) are padded to the largest in-degree with slots whose
weights are masked to zero (:func:`from_matrix` returns which slots are real).

Patterns, as in G2GNet (Konstantaropoulos et al., 2025, "Neuro-inspired Ensemble-to-Ensemble
Communication Primitives for Sparse and Efficient ANNs"), whose layers connect neuronal
ensembles (groups) sparsely rather than neuron to neuron:

* ``block_diagonal``: each output group reads the input groups "below" it (k = G_in / G_out).
* ``band`` / ``ring``: a contiguous cyclic band of k input groups (a ring lattice when centred).
* ``small_world``: a ring whose edges are each rewired with probability p to a random group
  (Watts & Strogatz, 1998), i.e. mostly local wiring plus a few long-range shortcuts.
* ``random``: k distinct input groups drawn uniformly per output group (the static random
  topology SET and RigL start from, at block granularity).
* ``top_k``: the k highest-scoring input groups per output group, for patterns derived from
  data (correlations of clustered units, weight mass of a trained layer).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Pattern = Literal["block_diagonal", "band", "ring", "small_world", "random"]


def _check(groups_out: int, groups_in: int, k: int) -> None:
    if groups_out < 1 or groups_in < 1:
        raise ValueError(f"connectivity: group counts must be >= 1, got {groups_out} x {groups_in}")
    if not 1 <= k <= groups_in:
        raise ValueError(f"connectivity: in-degree k={k} must lie in [1, {groups_in}] (input groups)")


def band(groups_out: int, groups_in: int, k: int, offset: int = 0) -> Tensor:
    """Output group ``o`` reads the cyclic band ``start(o) + [0, k)`` with ``start(o) = o * G_in // G_out + offset``.

    Returns:
        (G_out, k) long.
    """
    _check(groups_out, groups_in, k)
    start = torch.arange(groups_out) * groups_in // groups_out + offset
    return (start[:, None] + torch.arange(k)[None]) % groups_in


def ring(groups_out: int, groups_in: int, k: int) -> Tensor:
    """A ring lattice: the band of k input groups centred on each output group's position."""
    return band(groups_out, groups_in, k, offset=-(k // 2))


def block_diagonal(groups_out: int, groups_in: int) -> Tensor:
    """Disjoint blocks: output group ``o`` reads input groups ``o * G_in / G_out ...`` (one band each).

    With equal group counts this is the block-diagonal matrix (k = 1); with G_in a multiple of
    G_out each output group reads G_in / G_out consecutive input groups.
    """
    if groups_in % groups_out:
        raise ValueError(f"block_diagonal: {groups_in} input groups are not a multiple of {groups_out} output groups")
    return band(groups_out, groups_in, groups_in // groups_out)


def random_pattern(groups_out: int, groups_in: int, k: int, generator: torch.Generator | None = None) -> Tensor:
    """k distinct input groups per output group at random, each input group read equally often.

    Balanced out-degree (within one) keeps the input-gradient matmul free of padding
    (:mod:`.kernel`); it is also the random *regular* topology: no input group is favoured.
    Built from shuffled "tickets" (each input group repeated), with duplicates in a row
    repaired by swaps with other rows. Rows sorted.
    """
    _check(groups_out, groups_in, k)
    total = groups_out * k
    reps = -(-total // groups_in)
    extra = reps * groups_in - total
    counts = torch.full((groups_in,), reps)
    counts[torch.randperm(groups_in, generator=generator)[:extra]] -= 1
    tickets = torch.repeat_interleave(torch.arange(groups_in), counts)
    rows = tickets[torch.randperm(total, generator=generator)].view(groups_out, k).tolist()
    for _ in range(100 * total):
        bad = [(o, j) for o, row in enumerate(rows) for j, g in enumerate(row) if row.index(g) != j]
        if not bad:
            break
        o, j = bad[int(torch.randint(len(bad), (), generator=generator))]
        o2 = int(torch.randint(groups_out, (), generator=generator))
        j2 = int(torch.randint(k, (), generator=generator))
        a, b = rows[o][j], rows[o2][j2]
        if o2 != o and b not in rows[o] and a not in rows[o2]:
            rows[o][j], rows[o2][j2] = b, a
    else:
        raise RuntimeError(f"random_pattern: could not place {k} distinct groups per row ({groups_out}x{groups_in})")
    return torch.tensor(rows, dtype=torch.long).sort(dim=1).values


def small_world(
    groups_out: int, groups_in: int, k: int, p: float = 0.1, generator: torch.Generator | None = None
) -> Tensor:
    """A ring lattice with each edge moved, with probability ``p``, to a random unconnected input group."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"small_world: rewiring probability p={p} must lie in [0, 1]")
    src = ring(groups_out, groups_in, k)
    if k == groups_in:
        return src
    rows = []
    for row in src.tolist():
        for j in range(k):
            if float(torch.rand((), generator=generator)) < p:
                free = [g for g in range(groups_in) if g not in row]
                row[j] = free[int(torch.randint(len(free), (), generator=generator))]
        rows.append(sorted(row))
    return torch.tensor(rows, dtype=torch.long)


def top_k(scores: Tensor, k: int) -> Tensor:
    """The k highest-scoring input groups of each output group.

    Args:
        scores: (G_out, G_in) affinity of each group pair (e.g. block weight norm, |correlation|).
        k: in-degree.

    Returns:
        (G_out, k) long, rows sorted.
    """
    _check(scores.shape[0], scores.shape[1], k)
    return scores.topk(k, dim=1).indices.sort(dim=1).values


def from_matrix(connected: Tensor) -> tuple[Tensor, Tensor]:
    """A user-given (G_out, G_in) 0/1 matrix as padded sources plus which slots are real.

    Rows with fewer than the largest in-degree are padded with unconnected input groups (so a
    row's sources stay distinct); the layer masks the padded slots' weights to zero, so they
    cost compute but contribute nothing.

    Returns:
        ``(sources (G_out, k_max) long, real (G_out, k_max) bool)``.
    """
    connected = connected.bool()
    if connected.dim() != 2:
        raise ValueError(f"from_matrix: expected a (G_out, G_in) matrix, got shape {tuple(connected.shape)}")
    degree = connected.sum(1)
    if int(degree.min()) < 1:
        raise ValueError("from_matrix: every output group needs at least one input group")
    k = int(degree.max())
    # Sort each row so connected groups come first (stable: ascending group index), pad with the rest.
    order = torch.argsort((~connected).to(torch.int8), dim=1, stable=True)
    sources = order[:, :k]
    real = torch.arange(k)[None] < degree[:, None]
    return sources, real


def to_matrix(sources: Tensor, groups_in: int) -> Tensor:
    """(G_out, k) sources as a (G_out, G_in) bool connectivity matrix."""
    out = torch.zeros(sources.shape[0], groups_in, dtype=torch.bool, device=sources.device)
    return out.scatter_(1, sources, True)


def make_pattern(
    pattern: Pattern,
    groups_out: int,
    groups_in: int,
    k: int,
    *,
    p: float = 0.1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Build a named pattern with in-degree ``k``.

    ``block_diagonal`` has one in-degree only, G_in / G_out; any other ``k`` (a density it cannot
    give) is refused rather than silently replaced, so a layer's density is what was asked for.
    """
    if pattern == "block_diagonal":
        fixed = groups_in // groups_out if groups_out else 0
        if k != fixed and groups_out and not groups_in % groups_out:
            raise ValueError(
                f"pattern 'block_diagonal' connects each of {groups_out} output groups to G_in / G_out = {fixed} of "
                f"{groups_in} input groups, but the density asks for {k}; use density = {fixed}/{groups_in} "
                f"(times edge_density) or pattern 'band' for {k} consecutive groups"
            )
        return block_diagonal(groups_out, groups_in)
    if pattern == "band":
        return band(groups_out, groups_in, k)
    if pattern == "ring":
        return ring(groups_out, groups_in, k)
    if pattern == "small_world":
        return small_world(groups_out, groups_in, k, p, generator)
    if pattern == "random":
        return random_pattern(groups_out, groups_in, k, generator)
    raise ValueError(f"unknown connectivity pattern {pattern!r}; expected one of {Pattern.__args__}")
