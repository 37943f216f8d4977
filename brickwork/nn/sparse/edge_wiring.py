"""A group-to-group pattern held as an edge mask, so edge-level rewiring can move any edge.

G2GNet (Konstantaropoulos et al., 2025), SET (Mocanu et al., 2018) and RigL (Evci et al., 2020)
rewire *individual edges* of a masked layer: a dropped edge may be regrown anywhere, inside a
group pair that is already connected or in one that is not. A :class:`~.linear.GroupLinear`
built the usual way stores only its connected blocks, so its edge-level rewiring can regrow
only inside them. :func:`edge_wired` builds the layer with every block stored (in-degree
G_in) and the chosen pattern as the initial edge mask: the density and the starting wiring are
the pattern's, and a regrown edge can land in any block. The cost is that of the masked dense
layer those papers use (every block is multiplied; counted FLOPs and stored parameters are the
dense layer's): only a block pattern without edge rewiring runs sparsely.
"""

from __future__ import annotations

import torch

from brickwork.nn.sparse.connectivity import Pattern, make_pattern, to_matrix
from brickwork.nn.sparse.linear import GroupLinear, in_degree
from brickwork.nn.sparse.rewiring import Rewiring


def edge_wired(
    d_in: int,
    d_out: int,
    groups: int = 16,
    density: float = 0.25,
    groups_in: int | None = None,
    pattern: Pattern = "random",
    edge_density: float = 1.0,
    rewiring: Rewiring | None = None,
    small_world_p: float = 0.1,
) -> GroupLinear:
    """A :class:`GroupLinear` storing all G_out x G_in blocks whose edge mask is ``pattern``.

    Args:
        d_in, d_out, groups, groups_in, pattern, small_world_p: as for :class:`GroupLinear`.
        density: fraction of the (d_out, d_in) edges active, = k / G_in * ``edge_density``.
        edge_density: fraction of each connected block's edges active at the start.
        rewiring: the policy (edge level), attached once the mask is in place.

    Returns:
        The layer: ``sources`` lists every input group, ``mask`` (G_out, b_out, G_in * b_in) is
        on exactly in the pattern's blocks (``edge_density`` of their edges per output group),
        weights initialised for the active fan-in.
    """
    g_in = groups_in or groups
    k = in_degree(density, edge_density, g_in)
    connected = to_matrix(make_pattern(pattern, groups, g_in, k, p=small_world_p), g_in)  # (G_out, G_in)
    every = torch.arange(g_in).expand(groups, g_in)
    layer = GroupLinear(d_in, d_out, groups=groups, groups_in=g_in, connectivity=every, edge_density=density)
    # Slot j of every output group reads input group j: the pattern's matrix is the slot mask.
    mask = layer._initial_mask(edge_density, connected)
    assert mask is not None  # given the slots' mask, the layer always has one
    layer.mask = mask.to(layer.weight.device)
    layer.reset_parameters()
    layer.set_rewiring(rewiring)
    return layer
