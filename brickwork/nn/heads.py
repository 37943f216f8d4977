"""Heads: from the last hidden state to outputs."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from brickwork.nn.permutation import Perm, Symmetry
from brickwork.registry import register

Pool = Literal["none", "tokens", "spatial"]


def pool(x: Tensor, how: Pool) -> Tensor:
    """Reduce a hidden state to one vector per sample.

    ``tokens``: mean over T of (B, T, D); ``spatial``: mean over H, W of (B, C, H, W);
    ``none``: keep (B, D) as is (or any shape, for per-token heads).
    """
    if how == "tokens":
        return x.mean(dim=1)
    if how == "spatial":
        return x.mean(dim=(2, 3))
    return x


@register("brick", "classifier_head")
class ClassifierHead(nn.Module):
    """Pool, normalise, project to class logits. Also the shape of an early-exit head.

    Args:
        dim: hidden width D (channels C for spatial pooling).
        num_classes: number of outputs K.
        pool: how to reduce the hidden state per sample (see :func:`pool`).
        norm: apply LayerNorm before the projection (transformers).

    Shapes:
        (B, D) | (B, T, D) | (B, C, H, W) -> (B, K); with ``pool="none"`` on (B, T, D) -> (B, T, K)
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        pool: Pool = "none",
        norm: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.pool = pool
        self.norm = nn.LayerNorm(dim, device=device, dtype=dtype) if norm else nn.Identity()
        self.proj = nn.Linear(dim, num_classes, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.norm(pool(x, self.pool)))

    def permutation_symmetry(self) -> Symmetry:
        """Input features (channels or tokens' width) permute through pooling and LayerNorm; classes are fixed."""
        children = {"norm": {"in": "in", "out": "in"}, "proj": {"in": "in"}}
        return Symmetry({"in": Perm(0)}, inputs="in", children=children)


class SentenceClassifier(nn.Module):
    """A linear classifier on a sentence encoder's pooled embedding, for fine-tuning.

    Trailing columns that are padding (id 0) in every row are cut before encoding, so a batch
    padded to a fixed length costs only its longest sentence.

    Args:
        encoder: (B, T) int64 ids -> (B, dim) sentence embeddings.
        dim: embedding size.
        num_classes: classes of the linear head.

    Shapes:
        (B, T) int64 ids -> (B, num_classes) logits
    """

    def __init__(self, encoder: nn.Module, dim: int, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(dim, num_classes)

    def forward(self, ids: Tensor) -> Tensor:
        keep = int((ids != 0).any(0).nonzero().max()) + 1 if bool((ids != 0).any()) else 1
        return self.head(self.encoder(ids[:, :keep]))
