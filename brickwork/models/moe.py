"""Models whose FFNs are mixtures of experts, and their dense counterparts, from one builder.

One builder per architecture, with the FFN chosen by flat arguments: ``num_experts: 0`` gives
the dense model, so "dense with equal active parameters" (``hidden = top_k * expert_hidden``)
and "dense with equal total parameters" (``hidden = num_experts * expert_hidden``) are the
same builder with other numbers, compared on one plot.
"""

from __future__ import annotations

import math
from typing import Annotated

from pydantic import Field
from torch import nn

from brickwork.models.presets import DATA_ARGS
from brickwork.nn import (
    ClassifierHead,
    FeedForward,
    FlattenEmbed,
    MultiHeadAttention,
    Stack,
    StackModel,
    TokenEmbed,
    TransformerBlock,
)
from brickwork.nn.ffn import Activation
from brickwork.nn.moe import moe_ffn
from brickwork.nn.residual import ResidualFFN
from brickwork.nn.routing import MoESettings, feed_token_ids, wants_token_ids
from brickwork.registry import Flatten, register

Count = Annotated[int, Field(ge=0)]
Positive = Annotated[int, Field(ge=1)]
Routing = Annotated[MoESettings, Flatten]
_ROUTING = MoESettings()  # frozen: safe to share as a default


def ffn_brick(dim: int, hidden: int, num_experts: int, routing: MoESettings, act: Activation) -> nn.Module:
    """A dense FFN of inner width ``hidden`` (``num_experts == 0``), or E experts of that width."""
    if num_experts == 0:
        return FeedForward(dim, hidden, act=act)
    return moe_ffn(dim, hidden, num_experts=num_experts, routing=routing, act=act)


@register("model", "moe_mlp", injected=DATA_ARGS)
def moe_mlp(
    in_shape: tuple[int, ...],
    num_classes: int,
    width: Positive = 128,
    depth: Positive = 2,
    hidden: Positive = 128,
    num_experts: Count = 8,
    routing: Routing = _ROUTING,
    act: Activation = "gelu",
) -> StackModel:
    """Residual MLP whose body layers are ``x + FFN(LN(x))`` with a routed or dense FFN.

    Args:
        in_shape: per-sample input shape; flattened.
        num_classes: classes K.
        width: residual width D.
        depth: body layers.
        hidden: inner width of each expert (of the dense FFN when ``num_experts`` is 0).
        num_experts: E; 0 builds the dense model (which has nothing to route: the routing
            settings are then not used).
        routing: router (a registered name), ``top_k``, ``capacity_factor``, ``balance``,
            ``balance_rate``, ``noise`` (:class:`~brickwork.nn.routing.MoESettings`; flat keys
            in a config).
        act: FFN activation.

    Shapes:
        (B, *in_shape) -> (B, K)
    """
    layers = [ResidualFFN(width, ffn_brick(width, hidden, num_experts, routing, act)) for _ in range(depth)]
    return StackModel(
        FlattenEmbed(math.prod(in_shape), width), Stack(layers), ClassifierHead(width, num_classes, norm=True)
    )


@register("model", "moe_lm", injected=DATA_ARGS)
def moe_lm(
    in_shape: tuple[int],
    num_classes: int,
    dim: Positive = 64,
    depth: Positive = 2,
    heads: Positive = 4,
    hidden: Positive = 128,
    num_experts: Count = 8,
    routing: Routing = _ROUTING,
    act: Activation = "gelu",
) -> StackModel:
    """Causal transformer LM whose FFNs are mixtures of experts (dense when ``num_experts`` is 0).

    Args: as :func:`moe_mlp`, plus ``dim`` (width), ``heads``; ``in_shape`` is (T,) and
    ``num_classes`` the vocabulary size.

    Shapes:
        (B, T) int64 -> (B, T, V)
    """
    blocks = [
        TransformerBlock(
            dim, MultiHeadAttention(dim, heads, causal=True), ffn_brick(dim, hidden, num_experts, routing, act)
        )
        for _ in range(depth)
    ]
    model = StackModel(
        TokenEmbed(num_classes, dim, in_shape[0]),
        Stack(blocks),
        ClassifierHead(dim, num_classes, pool="none", norm=True),
    )
    if wants_token_ids(model):  # token-id routers (Roller et al.'s hash layers) read the input ids
        feed_token_ids(model)
    return model
