"""G2GNet-style MLP: group-to-group connected hidden layers, optionally rewired during training."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import Field
from torch import nn

from brickwork.models.presets import DATA_ARGS
from brickwork.nn import ClassifierHead, Stack, StackModel
from brickwork.nn.ffn import Activation
from brickwork.nn.sparse import GroupLinear, Level, LinearAct, Pattern, Rewiring
from brickwork.nn.sparse.schedule import Decay
from brickwork.registry import register

Fraction = Annotated[float, Field(gt=0, le=1)]


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
    regrow: Literal["none", "random", "gradient", "hebbian"] = "none",
    level: Level = "group",
    interval: Annotated[int, Field(ge=1)] = 100,
    fraction: Annotated[float, Field(ge=0, le=1)] = 0.3,
    decay: Decay = "cosine",
    stop: Annotated[float, Field(gt=0, le=1)] = 0.75,
    window: Annotated[int, Field(ge=1)] = 20,
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
        regrow: ``none`` (static), ``random`` (SET), ``gradient`` (RigL) or ``hebbian`` (G2GNet).
        level: what is rewired: ``edge``, ``group`` or ``both``.
        interval: steps between topology updates.
        fraction: fraction moved at the first update (then decayed by ``decay``).
        decay: ``cosine``, ``linear`` or ``constant``.
        stop: fraction of training after which the topology is frozen.
        window: steps of edge statistics before each update (Hebbian, edge level).

    Shapes:
        (B, *in_shape) -> (B, K)
    """
    d_in = math.prod(in_shape)

    def layer(a: int, b: int, g_in: int) -> GroupLinear:
        rewiring = None if regrow == "none" else Rewiring(regrow, level, interval, fraction, decay, stop, window)
        return GroupLinear(a, b, groups=groups, groups_in=g_in, density=density, edge_density=edge_density,
                           pattern=pattern, rewiring=rewiring)

    stem = nn.Sequential(nn.Flatten(1), LinearAct(layer(d_in, width, in_groups or groups), act))
    body = Stack([LinearAct(layer(width, width, groups), act, dropout) for _ in range(depth)])
    return StackModel(stem, body, ClassifierHead(width, num_classes))

