"""gamma-MoD's ARank: the rank of each layer's attention maps, to choose the layers that become
mixture-of-depths layers.

Luo et al. (2024), "gamma-MoD: Exploring Mixture-of-Depth Adaptation for Multimodal Large
Language Models", sec. 3.2: a layer whose attention maps have low rank carries redundant tokens,
so skipping most of its tokens costs little. ARank is the rank of the (T, T) attention matrix
``softmax(Q K^T / sqrt(d_h))`` averaged over heads and samples; the layers with the lowest ARank
are converted to MoD layers (:class:`~brickwork.nn.mod.MixtureOfDepths`; the conversion is
:mod:`brickwork.ops.gamma_mod`), the others stay dense.

The maps are rebuilt from the query and key projections that a forward hook reads off each
:class:`~brickwork.nn.attention.MultiHeadAttention` (its fused kernel never forms them); the
padding mask of sentence encoders is not applied, so use unpadded batches.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from brickwork.nn.attention import MultiHeadAttention
from brickwork.nn.modes import evaluating


def attention_maps(attn: MultiHeadAttention, qkv: Tensor) -> Tensor:
    """(B, heads, T, T) attention probabilities from ``attn``'s fused projection output (B, T, 3D)."""
    b, t, three_d = qkv.shape
    d = three_d // 3
    q, k, _ = qkv.view(b, t, 3, attn.heads, d // attn.heads).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d // attn.heads)
    if attn.causal:
        future = torch.ones(t, t, dtype=torch.bool, device=qkv.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return scores.softmax(-1)


@torch.no_grad()
def attention_ranks(model: nn.Module, x: Tensor, tol: float | None = None) -> dict[str, float]:
    """ARank of every attention layer of ``model`` on the batch ``x``: mean rank of its maps.

    Args:
        model: any model containing :class:`MultiHeadAttention` layers (run in eval mode, every
            submodule's mode restored after).
        x: a model input batch.
        tol: singular values below it count as zero (default: ``torch.linalg.matrix_rank``'s).

    Returns:
        ``{module path: ARank}`` in module order.
    """
    found: dict[str, Tensor] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, MultiHeadAttention):

            def hook(_m: nn.Module, _i: tuple[Tensor, ...], out: Tensor, *, attn: MultiHeadAttention = mod,
                     key: str = name) -> None:  # fmt: skip
                maps = attention_maps(attn, out.double())
                found[key] = torch.linalg.matrix_rank(maps, atol=tol).double().mean()

            handles.append(mod.qkv.register_forward_hook(hook))
    try:
        with evaluating(model):
            model(x)
    finally:
        for h in handles:
            h.remove()
    return {k: float(v) for k, v in found.items()}


def arank_mod_layers(ranks: list[float], num_mod: int) -> list[int]:
    """The ``num_mod`` layers with the lowest ARank (ties: the deeper layer first), in layer order.

    gamma-MoD converts the layers whose attention is most redundant; the rest stay dense.
    """
    if not 0 <= num_mod <= len(ranks):
        raise ValueError(f"arank_mod_layers: num_mod must be in [0, {len(ranks)}], got {num_mod}")
    order = sorted(range(len(ranks)), key=lambda i: (ranks[i], -i))
    return sorted(order[:num_mod])
