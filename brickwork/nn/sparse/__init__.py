"""Sparse modular wiring (G2GNet): group-to-group layers, dynamic sparse training, Hebbian rewiring.

* :class:`GroupLinear` / :class:`GroupConv2d`: units (channels) split into groups, connected
  group to group by a pattern (:mod:`.connectivity`), executed as gathers plus batched /
  grouped matmuls so time and FLOPs fall with density.
* :class:`Rewiring`: prune-and-regrow at fixed density, at edge or group level, regrowing at
  random (SET), by gradient (RigL) or by activation correlation (G2GNet's Hebbian rule).

Grouping units by the correlation of their activations is a measurement of a trained model, so it
lives in :func:`brickwork.analysis.clustering.cluster_units` (used by :mod:`brickwork.ops.sparsify`).
"""

from brickwork.nn.sparse.connectivity import (
    Pattern,
    band,
    block_diagonal,
    from_matrix,
    make_pattern,
    random_pattern,
    ring,
    small_world,
    to_matrix,
    top_k,
)
from brickwork.nn.sparse.conv import GroupConv2d
from brickwork.nn.sparse.edge_wiring import edge_wired
from brickwork.nn.sparse.kernel import BlockPlan, block_sparse_linear, build_plan
from brickwork.nn.sparse.layer import LinearAct
from brickwork.nn.sparse.linear import GroupLinear, in_degree
from brickwork.nn.sparse.rewiring import PAPER_SCHEDULES, Level, Regrow, Rewiring, RewiringSettings
from brickwork.nn.sparse.schedule import PruneSchedule
from brickwork.nn.sparse.stats import ActivationStats

__all__ = [
    "PAPER_SCHEDULES",
    "ActivationStats",
    "BlockPlan",
    "GroupConv2d",
    "GroupLinear",
    "Level",
    "LinearAct",
    "Pattern",
    "PruneSchedule",
    "Regrow",
    "Rewiring",
    "RewiringSettings",
    "band",
    "block_diagonal",
    "block_sparse_linear",
    "build_plan",
    "edge_wired",
    "from_matrix",
    "in_degree",
    "make_pattern",
    "random_pattern",
    "ring",
    "small_world",
    "to_matrix",
    "top_k",
]
