"""Convolutional bricks."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brickwork.nn.permutation import Perm, Symmetry
from brickwork.registry import register

Norm = Literal["batch", "group", "none"]


def _norm2d(kind: Norm, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        # One group = LayerNorm over (C, H, W): batch-independent, so sub-networks and merged
        # models need no re-estimated statistics.
        return nn.GroupNorm(1, channels)
    return nn.Identity()


@register("brick", "conv_block")
class ConvBlock(nn.Module):
    """``relu(norm(conv3x3(x)))`` with an optional stride-2 downsampling.

    Args:
        c_in: input channels.
        c_out: output channels.
        stride: 1 keeps the resolution, 2 halves it.
        norm: ``batch``, ``group`` (one group) or ``none``.

    Shapes:
        (B, c_in, H, W) -> (B, c_out, H / stride, W / stride)
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        stride: int = 1,
        norm: Norm = "batch",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=norm == "none", device=device, dtype=dtype)
        self.norm = _norm2d(norm, c_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.norm(self.conv(x)))

    def permutation_symmetry(self) -> Symmetry:
        """Output channels permute with the conv's filters; batch/group-norm parameters and running stats follow."""
        children = {"conv": {"in": "in", "out": "out"}}
        if not isinstance(self.norm, nn.Identity):
            children["norm"] = {"in": "out", "out": "out"}  # a GroupNorm of several groups is not offered: fixed
        return Symmetry({"in": Perm(0), "out": Perm(0)}, inputs="in", output="out", children=children)
