"""G2GNet-style MLP: group-to-group connected hidden layers, optionally rewired during training.

Rewiring defaults to the papers' level: single edges (G2GNet, SET, RigL), anywhere in the layer,
within and across the group-to-group pattern (:func:`~brickwork.nn.sparse.edge_wired`); a
rewired layer is then a masked dense layer, as in those papers. ``level: group`` moves whole
blocks instead, so the layer keeps running as a block-sparse product.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import Field
from torch import nn

from brickwork.models.presets import DATA_ARGS
from brickwork.nn import ClassifierHead, Stack, StackModel
from brickwork.nn.ffn import Activation
from brickwork.nn.sparse import GroupLinear, LinearAct, Pattern, RewiringSettings, edge_wired
from brickwork.registry import Flatten, register

Fraction = Annotated[float, Field(gt=0, le=1)]
_STATIC = RewiringSettings()  # frozen: safe to share as a default


@register("model", "sparse_mlp", injected=DATA_ARGS)
def sparse_mlp(
    in_shape: tuple[int, ...],
    num_classes: int,
    width: Annotated[int, Field(ge=1)] = 256,
    depth: Annotated[int, Field(ge=1)] = 2,
    act: Activation = "gelu",
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0,
    groups: Annotated[int, Field(ge=1)] = 16,
    in_groups: Annotated[int, Field(ge=1)] | None = None,
    density: Fraction = 0.25,
    edge_density: Fraction = 1.0,
    pattern: Pattern = "random",
    rewiring: Annotated[RewiringSettings, Flatten] = _STATIC,
    edge_regrowth: Literal["anywhere", "connected_blocks"] = "anywhere",
) -> StackModel:
    """MLP whose stem and body layers are :class:`GroupLinear` (the classifier head stays dense).

    The same shape as ``mlp`` (flatten -> width -> ``depth`` x width -> classes), so a dense
    ``mlp`` of equal width is the baseline at density 1.

    Args:
        in_shape: per-sample input shape; flattened (its size must divide into ``in_groups``).
        num_classes: number of classes K.
        width: hidden width (divisible by ``groups``).
        depth: hidden layers in the body.
        act: activation name.
        dropout: dropout after each body layer.
        groups: groups of every hidden representation.
        in_groups: groups of the flattened input (default: ``groups``).
        density: fraction of each group-connected layer's weights kept (1 - sparsity).
        edge_density: fraction kept inside connected blocks (an edge mask; needed for edge rewiring).
        pattern: initial group connectivity (``random``, ``ring``, ``band``, ``small_world``,
            ``block_diagonal``).
        rewiring: dynamic sparse training of every group-connected layer
            (:class:`~brickwork.nn.sparse.RewiringSettings`: regrow, level, interval, fraction,
            decay, stop, window, momentum; flat keys in a config). ``regrow: none`` is static.
            ``level`` unset means ``edge``; ``interval``/``fraction``/``decay``/``stop`` unset
            mean the chosen method's paper schedule.
        edge_regrowth: with edge-level rewiring, where a regrown edge may land: ``anywhere``
            (every block stored, the pattern as the initial edge mask: G2GNet, SET, RigL) or
            ``connected_blocks`` (only inside the blocks stored; needs ``edge_density < 1``).

    Shapes:
        (B, *in_shape) -> (B, K)
    """
    d_in = math.prod(in_shape)

    anywhere = rewiring.regrow != "none" and (rewiring.level or "edge") == "edge" and edge_regrowth == "anywhere"

    def layer(a: int, b: int, g_in: int) -> GroupLinear:
        if anywhere:
            return edge_wired(a, b, groups, density, g_in, pattern, edge_density, rewiring.policy("edge"))
        return GroupLinear(
            a,
            b,
            groups=groups,
            groups_in=g_in,
            density=density,
            edge_density=edge_density,
            pattern=pattern,
            rewiring=rewiring.policy("edge"),
        )

    stem = nn.Sequential(nn.Flatten(1), LinearAct(layer(d_in, width, in_groups or groups), act))
    body = Stack([LinearAct(layer(width, width, groups), act, dropout) for _ in range(depth)])
    return StackModel(stem, body, ClassifierHead(width, num_classes))
