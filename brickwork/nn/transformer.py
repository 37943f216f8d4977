"""Transformer blocks assembled from sub-bricks."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from brickwork.nn.permutation import Perm, Probe, Symmetry, passthrough_symmetry
from brickwork.registry import register


class ZeroBranch(nn.Module):
    """A residual branch that contributes nothing (a dropped sublayer): no FLOPs. (..., D) -> zeros."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.zeros_like(x)

    def permutation_symmetry(self) -> Symmetry:
        """Zeros are invariant to any permutation."""
        return passthrough_symmetry()


def _block_symmetry(dim: int) -> Symmetry:
    """A residual block: one permutation (the residual stream) for input, output, norms and both sublayers' ends."""
    both = {"in": "stream", "out": "stream"}
    children = {"norm1": both, "attn": both, "norm2": both, "ffn": both}
    return Symmetry(
        {"stream": Perm(dim)}, probes=[Probe("", "stream", -1)], inputs="stream", output="stream", children=children
    )


@register("brick", "transformer_block")
class TransformerBlock(nn.Module):
    """Pre-norm residual block ``x + attn(norm(x))`` then ``x + ffn(norm(x))``.

    The block takes its mixer and FFN as modules, so a mixture of experts, a nested-width FFN
    or a sparse FFN drops in without a flag (Xiong et al., 2020, for the pre-norm placement).

    Args:
        dim: model width D.
        attn: token mixer, (B, T, D) -> (B, T, D).
        ffn: position-wise network, (B, T, D) -> (B, T, D).
        dropout: dropout on each residual branch.

    Shapes:
        (B, T, D) -> (B, T, D)
    """

    def __init__(self, dim: int, attn: nn.Module, ffn: nn.Module, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attn
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = ffn
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.ffn(self.norm2(x)))

    def after_attention(self, x: Tensor) -> Tensor:
        """The residual stream after the attention sublayer only, ``x + attn(norm1(x))`` (for scoring it)."""
        return x + self.drop(self.attn(self.norm1(x)))

    def drop_attention_(self) -> None:
        """Remove the attention sublayer in place: the block becomes ``x + ffn(norm2(x))`` (Attention Drop)."""
        self.attn = ZeroBranch()

    def permutation_symmetry(self) -> Symmetry:
        """The residual stream is one permutation shared by the block's input, output, norms and sublayers."""
        return _block_symmetry(self.norm2.normalized_shape[0])


@register("brick", "post_norm_block")
class PostNormBlock(nn.Module):
    """Post-norm residual block ``norm(x + attn(x))`` then ``norm(x + ffn(x))`` (BERT, Vaswani et al.).

    Args:
        dim: model width D.
        attn: token mixer, (B, T, D) -> (B, T, D).
        ffn: position-wise network, (B, T, D) -> (B, T, D).
        dropout: dropout on each residual branch.
        eps: LayerNorm epsilon (1e-12 in BERT checkpoints).

    Shapes:
        (B, T, D) -> (B, T, D)
    """

    def __init__(self, dim: int, attn: nn.Module, ffn: nn.Module, dropout: float = 0.0, eps: float = 1e-5) -> None:
        super().__init__()
        self.attn = attn
        self.norm1: nn.Module = nn.LayerNorm(dim, eps=eps)  # drop_attention_ makes it the identity
        self.ffn = ffn
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm1(x + self.drop(self.attn(x)))
        return self.norm2(x + self.drop(self.ffn(x)))

    def after_attention(self, x: Tensor) -> Tensor:
        """The hidden state after the attention sublayer only, ``norm1(x + attn(x))`` (for scoring it)."""
        return self.norm1(x + self.drop(self.attn(x)))

    def drop_attention_(self) -> None:
        """Remove the whole attention sublayer in place, its norm included (the sublayer becomes the
        identity, the change its score measured): the block becomes ``norm2(x + ffn(x))``."""
        self.attn = ZeroBranch()
        self.norm1 = nn.Identity()

    def permutation_symmetry(self) -> Symmetry:
        """The residual stream is one permutation shared by the block's input, output, norms and sublayers."""
        return _block_symmetry(self.norm2.normalized_shape[0])
