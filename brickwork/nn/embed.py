"""Stems: from raw inputs to the first hidden state."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from brickwork.nn.permutation import Axis, Perm, Probe, Symmetry
from brickwork.registry import register


@register("brick", "patch_embed")
class PatchEmbed(nn.Module):
    """Split an image into non-overlapping patches, project each, add learned positions.

    As in ViT (Dosovitskiy et al., 2021), without a class token: heads mean-pool the tokens.

    Args:
        in_shape: per-sample image shape (C, H, W); H and W divisible by ``patch``.
        dim: token width D.
        patch: patch side P.

    Shapes:
        (B, C, H, W) -> (B, H*W/P^2, D)
    """

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        dim: int,
        patch: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        c, h, w = in_shape
        if h % patch or w % patch:
            raise ValueError(f"patch_embed: image {h}x{w} is not divisible into {patch}x{patch} patches")
        self.proj = nn.Conv2d(c, dim, patch, stride=patch, device=device, dtype=dtype)
        self.pos = nn.Parameter(torch.zeros(1, (h // patch) * (w // patch), dim, device=device, dtype=dtype))
        nn.init.trunc_normal_(self.pos, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2) + self.pos

    def permutation_symmetry(self) -> Symmetry:
        """Token width D permutes with the patch projection's filters and the position table."""
        perms = {"in": Perm(0), "out": Perm(0)}
        return Symmetry(
            perms, [Axis("pos", 2, "out")], inputs="in", output="out", children={"proj": {"in": "in", "out": "out"}}
        )


@register("brick", "token_embed")
class TokenEmbed(nn.Module):
    """Token embedding plus learned absolute position embedding.

    Args:
        vocab_size: number of token ids V.
        dim: width D.
        max_len: longest sequence T the position table covers.

    Shapes:
        (B, T) int64 -> (B, T, D)
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab_size, dim, device=device, dtype=dtype)
        self.pos = nn.Embedding(max_len, dim, device=device, dtype=dtype)
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        return self.tok(idx) + self.pos(torch.arange(t, device=idx.device))

    def permutation_symmetry(self) -> Symmetry:
        """Width D permutes with both tables' columns; token ids are not permutable."""
        axes = [Axis("tok.weight", 1, "out"), Axis("pos.weight", 1, "out")]
        return Symmetry({"out": Perm(self.tok.embedding_dim)}, axes, [Probe("", "out", -1)], output="out")


@register("brick", "flatten_embed")
class FlattenEmbed(nn.Module):
    """Flatten the input and project it: the stem of a multi-layer perceptron.

    Args:
        in_features: product of the per-sample input shape.
        dim: hidden width.

    Shapes:
        (B, *in_shape) -> (B, dim)
    """

    def __init__(
        self,
        in_features: int,
        dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, dim, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.gelu(self.proj(x.flatten(1)))

    def permutation_symmetry(self) -> Symmetry:
        """Output units permute with the projection's rows (GELU is elementwise)."""
        return Symmetry(
            {"in": Perm(0), "out": Perm(0)}, inputs="in", output="out", children={"proj": {"in": "in", "out": "out"}}
        )
