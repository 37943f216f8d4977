"""Prune and regrow at fixed density: pure functions on a layer's tensors.

Both levels follow the same rule (SET, Mocanu et al., 2018; RigL, Evci et al., 2020): drop
the n active connections of smallest magnitude, then grow n connections that were inactive
*before* this update, ranked by a score (gradient magnitude for RigL, activation correlation
for the Hebbian rule of G2GNet) or at random (SET). Excluding the connections dropped in the
same update means every update really moves n connections (RigL's code lets a dropped weight be
regrown, which then merely resets it to zero). Dropped and grown weights are set to zero, so a
grown connection starts at zero as in RigL.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _random_scores(shape: torch.Size, generator: torch.Generator, device: torch.device) -> Tensor:
    return torch.rand(shape, generator=generator).to(device)


@torch.no_grad()
def swap_edges(weight: Tensor, mask: Tensor, n: int, grow_score: Tensor | None, generator: torch.Generator) -> int:
    """Move n edges inside the connected blocks; edits ``weight`` and ``mask`` in place.

    Args:
        weight: (G_out, b_out, K) compressed weight (a parameter's data).
        mask: (G_out, b_out, K) bool, the active edges; its count is preserved.
        n: edges to move (clipped to what is available).
        grow_score: (G_out, b_out, K) score of each edge for regrowth, or None for random.
        generator: CPU generator for random regrowth and tie-free random scores.

    Returns:
        The number of edges moved.
    """
    active = mask.reshape(-1)
    n = min(n, int(active.sum()), int((~active).sum()))
    if n <= 0:
        return 0
    magnitude = weight.abs().reshape(-1).masked_fill(~active, float("inf"))
    drop = magnitude.topk(n, largest=False).indices
    score = (
        grow_score.reshape(-1).float()
        if grow_score is not None
        else _random_scores(active.shape, generator, weight.device)
    )
    grow = score.masked_fill(active, float("-inf")).topk(n).indices
    flat = mask.view(-1)
    flat[drop] = False
    flat[grow] = True
    w = weight.view(-1)
    w[drop] = 0.0
    w[grow] = 0.0
    return n


@torch.no_grad()
def swap_blocks(
    sources: Tensor,
    groups_in: int,
    block_score: Tensor,
    n: int,
    grow_score: Tensor | None,
    generator: torch.Generator,
) -> list[tuple[int, int, int]]:
    """Choose n block moves that keep every output group's in-degree.

    The n connected slots of smallest ``block_score`` are dropped; each dropped slot (o, j) is
    refilled with the input group of highest ``grow_score[o]`` among those o did not read before
    this update (random order when ``grow_score`` is None). Does not edit anything.

    Args:
        sources: (G_out, k) input group of each slot.
        groups_in: G_in.
        block_score: (G_out, k) magnitude of each connected block (e.g. RMS of its weights).
        n: blocks to move.
        grow_score: (G_out, G_in) regrowth score of each group pair, or None for random.
        generator: CPU generator for random regrowth.

    Returns:
        Moves ``(o, j, new_input_group)``.
    """
    groups_out, k = sources.shape
    if grow_score is None:
        grow_score = torch.rand(groups_out, groups_in, generator=generator)
    score = grow_score.detach().float().cpu().clone()
    src = sources.cpu()
    score.scatter_(1, src, float("-inf"))  # connected before the update: not eligible
    n = min(n, sources.numel())
    if n <= 0 or k == groups_in:
        return []
    drop = block_score.detach().reshape(-1).cpu().topk(n, largest=False).indices.tolist()
    moves = []
    for flat in drop:
        o, j = divmod(flat, k)
        g = int(score[o].argmax())
        if score[o, g] == float("-inf"):
            continue  # o already reads every input group it could
        score[o, g] = float("-inf")
        moves.append((o, j, g))
    return moves
