"""gamma-MoD: convert the layers whose attention is most redundant into mixture-of-depths layers.

Luo et al. (2024), "gamma-MoD: Exploring Mixture-of-Depth Adaptation for Multimodal Large
Language Models": measure each layer's ARank (the rank of its attention maps,
:mod:`brickwork.analysis.arank`), turn the lowest-ARank layers into MoD layers
(:class:`~brickwork.nn.mod.MixtureOfDepths`: only the top ``capacity`` fraction of each sequence's
tokens runs the block), keep the others dense, then fine-tune. The MoD layers here weigh the
block's update by p-MoD's TanhNorm ``w = 1 + s tanh(r)`` with a zero-initialised router, so
``w = 1`` at conversion: at capacity 1.0 the converted model computes the dense one exactly, and
at lower capacity the processed tokens get exactly the dense update. Simplified against the
paper: no shared router across layers and no masked routing learning (its treatment of
question tokens in an MLLM); the layer choice by ARank is the paper's.

``choice`` picks the layers: ``arank`` (gamma-MoD), or the baselines ``last`` (the last layers)
and ``all`` (every layer). :func:`gamma_mod` copies; the recipe :func:`gamma_mod_like` replays
the structure on a freshly built model (weights come after).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from brickwork.analysis.arank import arank_mod_layers, attention_ranks
from brickwork.nn.attention import MultiHeadAttention
from brickwork.nn.mod import MixtureOfDepths
from brickwork.nn.stack import StackModel, stack_of

Choice = Literal["arank", "last", "all"]


def body_aranks(model: StackModel, x: Tensor) -> list[float]:
    """ARank of each body layer of ``model`` on the batch ``x`` (NaN for a layer without attention).

    Shapes:
        x: a model input batch, e.g. (B, C, H, W) images or (B, T) token ids, without padding.
    """
    ranks = attention_ranks(model, x)
    out = []
    for i in range(len(model.body)):
        mine = [r for path, r in ranks.items() if path.startswith(f"body.layers.{i}.")]
        out.append(sum(mine) / len(mine) if mine else float("nan"))
    return out


def choose_layers(ranks: Sequence[float], num_mod: int, choice: Choice) -> list[int]:
    """The body layers to convert: the ``num_mod`` lowest-ARank ones, the last ``num_mod``, or all."""
    n = len(ranks)
    if choice == "all":
        return list(range(n))
    if not 0 <= num_mod <= n:
        raise ValueError(f"gamma_mod: num_mod must be in [0, {n}], got {num_mod}")
    if choice == "last":
        return list(range(n - num_mod, n))
    return arank_mod_layers(list(ranks), num_mod)


def _width(block: nn.Module) -> int:
    attn = next((m for m in block.modules() if isinstance(m, MultiHeadAttention)), None)
    if attn is None:
        raise ValueError(f"gamma_mod: body layer {type(block).__name__} has no attention (MoD routes tokens)")
    return int(attn.qkv.in_features)


def gamma_mod_like(model: nn.Module, recipe: Mapping[str, Any]) -> StackModel:
    """Replay a recorded conversion in place: wrap ``recipe["layers"]`` in MoD layers."""
    model = stack_of(model)
    for i in recipe["layers"]:
        block = model.body.layers[i]
        mod = MixtureOfDepths(block, _width(block), recipe["capacity"], "tanh", recipe.get("tanh_scale", 0.2))
        with torch.no_grad():  # TanhNorm weight exactly 1 until the router learns
            mod.router.weight.zero_()
            mod.router.bias.zero_()
        p = next(block.parameters(), None)
        if p is not None:
            mod.router.to(device=p.device, dtype=p.dtype)
        model.body.layers[i] = mod
    return model


def gamma_mod(
    model: StackModel, layers: Sequence[int], capacity: float, tanh_scale: float = 0.2
) -> tuple[StackModel, dict[str, Any]]:
    """A copy of ``model`` whose body ``layers`` are mixture-of-depths layers, and its recipe.

    Args:
        model: a stack model whose body layers are (B, T, D) -> (B, T, D) transformer blocks.
        layers: body layer indices to convert (e.g. :func:`choose_layers`).
        capacity: fraction of tokens each converted layer processes.
        tanh_scale: ``s`` of the TanhNorm router weight (p-MoD: 0.2).

    Returns:
        The converted copy (the input is unchanged) and the plain-JSON recipe
        ``{"op": "gamma_mod", "layers", "capacity", "tanh_scale"}``.
    """
    recipe = {"op": "gamma_mod", "layers": sorted(set(layers)), "capacity": capacity, "tanh_scale": tanh_scale}
    return gamma_mod_like(copy.deepcopy(model), recipe), recipe
