"""Bricks for padded token sequences: BERT-style embeddings and a masked mean-pool head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brickwork.nn.masking import PaddingMask
from brickwork.registry import register


@register("brick", "bert_embed")
class BertEmbed(nn.Module):
    """Word + position + token-type embeddings, then LayerNorm (Devlin et al., 2019).

    Writes the padding mask (ids != ``pad_id``) into the shared ``padding`` holder, so the
    attention layers and the pooling head of the same model skip padded positions.

    Args:
        vocab_size: number of token ids V.
        dim: width D.
        max_len: longest sequence the position table covers.
        type_vocab: number of token types (segments).
        pad_id: id of the padding token.
        eps: LayerNorm epsilon.
        padding: the shared :class:`PaddingMask` to write; None for no masking.
        roberta_positions: number positions as RoBERTa does (Liu et al., 2019, after fairseq):
            real tokens count from ``pad_id + 1``, padding takes position ``pad_id``; otherwise
            positions are ``0 .. T-1`` (BERT).

    Shapes:
        (B, T) int64 -> (B, T, D)
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        max_len: int = 512,
        type_vocab: int = 2,
        pad_id: int = 0,
        eps: float = 1e-12,
        padding: PaddingMask | None = None,
        roberta_positions: bool = False,
    ) -> None:
        super().__init__()
        self.roberta_positions = roberta_positions
        self.word = nn.Embedding(vocab_size, dim, padding_idx=pad_id)
        self.position = nn.Embedding(max_len, dim)
        self.token_type = nn.Embedding(type_vocab, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.pad_id = pad_id
        self.padding = padding

    def forward(self, ids: Tensor) -> Tensor:
        if self.padding is not None:
            self.padding.set(ids != self.pad_id)
        if self.roberta_positions:
            real = (ids != self.pad_id).long()
            positions = torch.cumsum(real, dim=1) * real + self.pad_id  # (B, T), as transformers' Roberta
        else:
            positions = torch.arange(ids.shape[1], device=ids.device)
        # Single-segment inputs: every token has type 0, as sentence-transformers encodes them.
        h = self.word(ids) + self.position(positions) + self.token_type.weight[0]
        return self.norm(h)


@register("brick", "mean_pool_head")
class MeanPoolHead(nn.Module):
    """Mean over the real (unpadded) tokens, optionally L2-normalised: a sentence embedding.

    Args:
        padding: the shared :class:`PaddingMask` (None: every position is real).
        normalize: L2-normalise the pooled vector (sentence-transformers' ``Normalize``).

    Shapes:
        (B, T, D) -> (B, D)
    """

    def __init__(self, padding: PaddingMask | None = None, normalize: bool = True) -> None:
        super().__init__()
        self._padding = [padding] if padding is not None else []
        self.normalize = normalize

    def forward(self, h: Tensor) -> Tensor:
        mask = self._padding[0].mask if self._padding else None
        if mask is None:
            pooled = h.mean(dim=1)
        else:
            m = mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1) if self.normalize else pooled
