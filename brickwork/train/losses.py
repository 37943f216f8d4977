"""Task losses by name. Auxiliary losses of bricks are collected separately (nn.records)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from brickwork.registry import REGISTRY, register

LossFn = Callable[[Tensor, Tensor], Tensor]


@register("loss", "cross_entropy")
def cross_entropy(label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.0) -> LossFn:
    """Cross-entropy over the last dim; works for (B, K) logits with (B,) targets and for
    (B, T, V) next-token logits with (B, T) targets."""

    def loss(logits: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(logits.flatten(0, -2), target.flatten(), label_smoothing=label_smoothing)

    return loss


def build_loss(name: str, **args: object) -> LossFn:
    """The registered loss ``name`` configured with ``args``."""
    return REGISTRY.get("loss", name).obj(**args)
