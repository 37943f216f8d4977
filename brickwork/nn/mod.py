"""Mixture-of-depths: a router lets only a capacity fraction of tokens through a block.

Raposo et al. (2024), "Mixture-of-Depths: Dynamically allocating compute in transformer-based
language models": a scalar router scores each token; per sequence the top ``C = ceil(c * T)``
tokens go through the block, the others skip it (identity). The block runs on the gathered
(B, C, D) tokens only, so its FLOPs (attention included, now over C tokens) shrink with ``c``
and :class:`~brickwork.analysis.compute.FlopMeter` counts only what ran. The block's update for
a processed token is scaled by the router weight, which is what gives the router a gradient:
``out = x + w(r) * (block(x) - x)``.

p-MoD (Zhang et al., 2024, "p-MoD: Building Mixture-of-Depths MLLMs via Progressive Ratio
Decay") adds: tanh-gated weight normalisation (TanhNorm, ``w = 1 + s * tanh(r)``, so an
untrained router leaves the block's update intact), symmetric token reweighting (STRing: the
skipped tokens are scaled by their ``w`` too, so the router also learns from them), and a
per-layer capacity decaying with depth (:func:`pmod_capacities`). gamma-MoD (Luo et al., 2024)
chooses which layers to convert by the rank of their attention maps (ARank: the lowest-rank
layers become MoD layers): :func:`brickwork.analysis.arank.attention_ranks` measures it and
:func:`~brickwork.analysis.arank.arank_mod_layers` picks the layers, and
:func:`brickwork.ops.gamma_mod.gamma_mod` (stage ``gamma_mod``) converts them; :func:`pmod_capacities`
or your own list sets the capacities.

The gathered tokens keep their original order, so a causal block stays causal among them.
Selecting top-C over the whole sequence looks at future tokens; for autoregressive sampling,
Raposo et al. train the router to predict its own top-C membership (``causal_aux``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import pydantic
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brickwork.nn.attention import MultiHeadAttention
from brickwork.nn.ffn import Activation, FeedForward
from brickwork.nn.transformer import TransformerBlock
from brickwork.registry import register

# How the router logit r scales the block's update:
# * linear: w = r (Raposo et al.); the router output itself multiplies the update;
# * sigmoid: w = sigmoid(r), bounded in (0, 1);
# * tanh: w = 1 + s * tanh(r) (p-MoD's TanhNorm), close to 1 at initialisation.
RouterWeight = Literal["linear", "sigmoid", "tanh"]


@dataclass
class DepthRecord:
    """What a :class:`MixtureOfDepths` layer did in its latest forward (detached).

    Attributes:
        selected: (B, C) sorted indices of the processed tokens per sequence.
        seq_len: T.
        capacity: C, tokens processed per sequence.
        logits: (B, T) router logits.
    """

    selected: Tensor
    seq_len: int
    capacity: int
    logits: Tensor

    @property
    def processed_fraction(self) -> float:
        return self.capacity / self.seq_len if self.seq_len else 0.0


@register("brick", "mixture_of_depths")
class MixtureOfDepths(nn.Module):
    """Route the top ``capacity`` fraction of each sequence's tokens through ``block``.

    Args:
        block: any (B, C, D) -> (B, C, D) block; its update is ``block(x) - x`` (for a residual
            block such as :class:`~brickwork.nn.transformer.TransformerBlock` that is its
            residual branch).
        dim: width D.
        capacity: fraction c of tokens processed per sequence (Raposo et al.: 0.125).
        weight: how the router logit scales the update (:data:`RouterWeight`).
        tanh_scale: ``s`` of the tanh weight (p-MoD: 0.2).
        reweight_skipped: p-MoD's STRing, scale skipped tokens by their weight too
            (only with ``weight="tanh"``, whose weights are near 1).
        causal_aux: emit ``"mod_topk_bce"``, a BCE loss teaching the router's logit to predict
            top-C membership (Raposo et al., for autoregressive sampling).

    Shapes:
        (B, T, D) -> (B, T, D)
    """

    def __init__(
        self,
        block: nn.Module,
        dim: int,
        capacity: Annotated[float, pydantic.Field(gt=0, le=1)] = 0.125,
        weight: RouterWeight = "linear",
        tanh_scale: Annotated[float, pydantic.Field(gt=0)] = 0.2,
        reweight_skipped: bool = False,
        causal_aux: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 0 < capacity <= 1:
            raise ValueError(f"MixtureOfDepths: capacity must be in (0, 1], got {capacity}")
        if reweight_skipped and weight != "tanh":
            raise ValueError("MixtureOfDepths: reweight_skipped needs weight='tanh' (weights near 1)")
        self.block = block
        self.router = nn.Linear(dim, 1, device=device, dtype=dtype)
        self.capacity = capacity
        self.weight = weight
        self.tanh_scale = tanh_scale
        self.reweight_skipped = reweight_skipped
        self.causal_aux = causal_aux
        self.aux_losses: dict[str, Tensor] = {}
        self.record: DepthRecord | None = None

    def tokens_processed(self, seq_len: int) -> int:
        """C = ceil(capacity * T), at least 1."""
        return max(1, min(seq_len, math.ceil(self.capacity * seq_len - 1e-9)))

    def _weight(self, r: Tensor) -> Tensor:
        if self.weight == "linear":
            return r
        if self.weight == "sigmoid":
            return torch.sigmoid(r)
        return 1.0 + self.tanh_scale * torch.tanh(r)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3:
            raise ValueError(f"MixtureOfDepths expects (B, T, D), got {tuple(x.shape)}")
        b, t, d = x.shape
        logits = self.router(x).squeeze(-1)  # (B, T)
        c = self.tokens_processed(t)
        idx = torch.topk(logits, c, dim=1, sorted=False).indices.sort(dim=1).values  # keep token order
        gather = idx.unsqueeze(-1).expand(b, c, d)
        chosen = x.gather(1, gather)  # (B, C, D): the block runs on these only
        w = self._weight(logits.gather(1, idx)).unsqueeze(-1).to(x.dtype)
        update = (self.block(chosen) - chosen) * w
        base = x
        if self.reweight_skipped:
            # STRing: every token is scaled by its weight; processed ones then get the update.
            base = x * self._weight(logits).unsqueeze(-1).to(x.dtype)
            update = update + chosen - base.gather(1, gather)
        out = base.scatter_add(1, gather, update)

        self.aux_losses = {}
        if self.training and self.causal_aux:
            target = torch.zeros_like(logits).scatter_(1, idx, 1.0)
            self.aux_losses["mod_topk_bce"] = F.binary_cross_entropy_with_logits(logits.float(), target.float())
        self.record = DepthRecord(selected=idx.detach(), seq_len=t, capacity=c, logits=logits.detach())
        return out

    def extra_repr(self) -> str:
        return f"capacity={self.capacity}, weight={self.weight}, reweight_skipped={self.reweight_skipped}"


def pmod_capacities(
    num_layers: int,
    mean: float = 0.5,
    schedule: Literal["cosine", "linear"] = "cosine",
    min_capacity: float = 0.0,
    dense_above: float = 1.0,
) -> list[float]:
    """Per-layer capacities decaying with depth: p-MoD's progressive ratio decay (PRD).

    p-MoD's shifted cosine: ``c_l = mean + cos(pi * l / (L - 1)) / 2`` for layer ``l`` of L,
    which falls from ``mean + 0.5`` at the first layer to ``mean - 0.5`` at the last
    (``linear``: ``mean + 0.5 - l / (L - 1)``). Values are clipped to ``[min_capacity, 1]``;
    layers whose value exceeds ``dense_above`` get 1.0 (p-MoD keeps them as dense layers).

    Args:
        num_layers: L.
        mean: the shift; the average capacity before clipping.
        schedule: ``"cosine"`` (p-MoD's choice) or ``"linear"``.
        min_capacity: lower clip (p-MoD's minimum ratio).
        dense_above: capacities above this become 1.0 (dense).

    Returns:
        L capacities in (0, 1].
    """
    out = []
    for layer in range(num_layers):
        p = layer / (num_layers - 1) if num_layers > 1 else 0.0
        c = mean + (0.5 * math.cos(math.pi * p) if schedule == "cosine" else 0.5 - p)
        c = 1.0 if c > dense_above else c
        out.append(min(1.0, max(min_capacity, c, 1e-6)))
    return out


@register("brick", "mod_transformer_block")
def mod_transformer_block(
    dim: int,
    heads: int,
    hidden: int,
    capacity: Annotated[float, pydantic.Field(gt=0, le=1)] = 0.125,
    act: Activation = "gelu",
    causal: bool = False,
    weight: RouterWeight = "linear",
    causal_aux: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> MixtureOfDepths:
    """A pre-norm :class:`TransformerBlock` wrapped in :class:`MixtureOfDepths` (flat arguments).

    Shapes:
        (B, T, D) -> (B, T, D)
    """
    kw: dict[str, Any] = {"device": device, "dtype": dtype}
    block = TransformerBlock(
        dim, MultiHeadAttention(dim, heads, causal=causal, **kw), FeedForward(dim, hidden, act, **kw)
    )
    if device is not None or dtype is not None:
        block = block.to(**{k: v for k, v in kw.items() if v is not None})
    return MixtureOfDepths(block, dim, capacity, weight, causal_aux=causal_aux, **kw)
