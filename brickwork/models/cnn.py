"""Small convolutional classifier from bricks."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from brickwork.models.presets import DATA_ARGS, preset
from brickwork.nn import ClassifierHead, ConvBlock, Stack, StackModel
from brickwork.nn.conv import Norm
from brickwork.registry import register


@register("model", "cnn", injected=DATA_ARGS)
def cnn(
    in_shape: tuple[int, int, int],
    num_classes: int,
    channels: tuple[int, ...] = (16, 32, 64),
    blocks: Annotated[int, Field(ge=1)] = 1,
    norm: Norm = "batch",
) -> StackModel:
    """CNN: conv stem, then per stage ``blocks`` conv blocks (the first halves the resolution).

    Every conv block is one layer of the body, so exits and depth operations can tap it.

    Args:
        in_shape: per-sample image shape (C, H, W).
        num_classes: number of classes K.
        channels: channels of each stage; the stem has ``channels[0]``.
        blocks: conv blocks per stage.
        norm: normalisation in every block (``batch``, ``group``, ``none``).

    Shapes:
        (B, C, H, W) -> (B, K)
    """
    if len(in_shape) != 3:
        raise ValueError(f"cnn: expects images (C, H, W), got input shape {tuple(in_shape)}")
    stem = ConvBlock(in_shape[0], channels[0], norm=norm)
    layers, c = [], channels[0]
    for c_out in channels:
        for b in range(blocks):
            layers.append(ConvBlock(c, c_out, stride=2 if b == 0 else 1, norm=norm))
            c = c_out
    return StackModel(stem, Stack(layers), ClassifierHead(c, num_classes, pool="spatial"))


preset(cnn, "cnn-tiny", "CNN, stages of 16, 32 and 64 channels, one block each.", channels=(16, 32, 64), blocks=1)
preset(cnn, "cnn-small", "CNN, stages of 32, 64 and 128 channels, two blocks each.", channels=(32, 64, 128), blocks=2)
