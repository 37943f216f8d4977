"""Transformers from bricks: a vision transformer and a causal language model."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from brickwork.models.presets import DATA_ARGS, preset
from brickwork.nn import (
    ClassifierHead,
    FeedForward,
    MultiHeadAttention,
    PatchEmbed,
    Stack,
    StackModel,
    TokenEmbed,
    TransformerBlock,
)
from brickwork.registry import register


def transformer_stack(dim: int, depth: int, heads: int, mlp_ratio: int, causal: bool, dropout: float) -> Stack:
    """``depth`` pre-norm blocks of attention + GELU FFN, (B, T, D) -> (B, T, D)."""
    return Stack(
        [
            TransformerBlock(
                dim,
                MultiHeadAttention(dim, heads, causal=causal),
                FeedForward(dim, mlp_ratio * dim, dropout=dropout),
                dropout=dropout,
            )
            for _ in range(depth)
        ]
    )


@register("model", "vit", injected=DATA_ARGS)
def vit(
    in_shape: tuple[int, int, int],
    num_classes: int,
    dim: Annotated[int, Field(ge=1)] = 64,
    depth: Annotated[int, Field(ge=1)] = 2,
    heads: Annotated[int, Field(ge=1)] = 4,
    patch: Annotated[int, Field(ge=1)] = 4,
    mlp_ratio: Annotated[int, Field(ge=1)] = 2,
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0,
) -> StackModel:
    """Vision transformer (Dosovitskiy et al., 2021) with mean-pooled tokens instead of [CLS].

    Args:
        in_shape: per-sample image shape (C, H, W), H and W divisible by ``patch``.
        num_classes: number of classes K.
        dim: token width D.
        depth: number of transformer blocks.
        heads: attention heads per block.
        patch: patch side.
        mlp_ratio: FFN hidden width as a multiple of D.
        dropout: dropout on residual branches and FFN activations.

    Shapes:
        (B, C, H, W) -> (B, K)
    """
    if len(in_shape) != 3:
        raise ValueError(f"vit: expects images (C, H, W), got input shape {tuple(in_shape)}")
    return StackModel(
        PatchEmbed(in_shape, dim, patch),
        transformer_stack(dim, depth, heads, mlp_ratio, causal=False, dropout=dropout),
        ClassifierHead(dim, num_classes, pool="tokens", norm=True),
    )


@register("model", "transformer_lm", injected=DATA_ARGS)
def transformer_lm(
    in_shape: tuple[int],
    num_classes: int,
    dim: Annotated[int, Field(ge=1)] = 64,
    depth: Annotated[int, Field(ge=1)] = 2,
    heads: Annotated[int, Field(ge=1)] = 4,
    mlp_ratio: Annotated[int, Field(ge=1)] = 4,
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0,
) -> StackModel:
    """Causal (GPT-style) transformer language model over tokens.

    Args:
        in_shape: (T,), the context length; positions beyond it are not embedded.
        num_classes: vocabulary size V.
        dim, depth, heads, mlp_ratio, dropout: as in :func:`vit`.

    Shapes:
        (B, T) int64 -> (B, T, V) next-token logits
    """
    return StackModel(
        TokenEmbed(num_classes, dim, in_shape[0]),
        transformer_stack(dim, depth, heads, mlp_ratio, causal=True, dropout=dropout),
        ClassifierHead(dim, num_classes, pool="none", norm=True),
    )


preset(vit, "vit-tiny", "ViT, width 64, 2 blocks, 4 heads.", dim=64, depth=2, heads=4)
preset(vit, "vit-small", "ViT, width 128, 4 blocks, 4 heads.", dim=128, depth=4, heads=4)
preset(transformer_lm, "lm-tiny", "Causal LM, width 64, 2 blocks, 4 heads.", dim=64, depth=2, heads=4)
preset(transformer_lm, "lm-small", "Causal LM, width 128, 4 blocks, 4 heads.", dim=128, depth=4, heads=4)
