"""Multi-layer perceptron classifier from bricks."""

from __future__ import annotations

import math
from typing import Annotated

from pydantic import Field

from brickwork.models.presets import DATA_ARGS, preset
from brickwork.nn import ClassifierHead, DenseLayer, FlattenEmbed, Stack, StackModel
from brickwork.nn.ffn import Activation
from brickwork.registry import register


@register("model", "mlp", injected=DATA_ARGS)
def mlp(
    in_shape: tuple[int, ...],
    num_classes: int,
    width: Annotated[int, Field(ge=1)] = 128,
    depth: Annotated[int, Field(ge=1)] = 2,
    act: Activation = "gelu",
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0,
) -> StackModel:
    """MLP: flatten -> Linear(width) -> ``depth`` x DenseLayer(width) -> Linear(classes).

    Args:
        in_shape: per-sample input shape; flattened.
        num_classes: number of classes K.
        width: hidden width of every layer.
        depth: number of hidden layers in the body (the tappable stack).
        act: activation name.
        dropout: dropout after each body layer.

    Shapes:
        (B, *in_shape) -> (B, K)
    """
    layers = [DenseLayer(width, width, act=act, dropout=dropout) for _ in range(depth)]
    return StackModel(FlattenEmbed(math.prod(in_shape), width), Stack(layers), ClassifierHead(width, num_classes))


preset(mlp, "mlp-tiny", "MLP, 2 hidden layers of 64 units.", width=64, depth=2)
preset(mlp, "mlp-small", "MLP, 3 hidden layers of 256 units.", width=256, depth=3)
