"""Sparse upcycling: a trained dense FFN becomes a mixture of E experts that starts as the FFN.

Komatsuzaki et al. (2023), "Sparse Upcycling: Training Mixture-of-Experts from Dense
Checkpoints": every expert is a copy of the dense FFN and a new router is added; since a
renormalised top-k gate's combine weights sum to one per token, ``sum_k w_k FFN(x) = FFN(x)``
whatever the router's weights, so the upcycled model computes the dense model exactly at the
start (tested for every renormalised router, at random router weights).

Fine-grained upcycling (``granularity`` G > 1, in the manner of Megatron-Core's granular
upcycling, ``moe_upcycling_granularity``): the FFN's H neurons are cut into G slices of H / G,
the E experts are E / G copies of each slice (expert ``c * G + g`` is copy c of slice g), and
the slices' output projections are multiplied by G: when the router spreads a token's weight
evenly over ``top_k`` experts holding every slice ``top_k / G`` times, each slice's weights
sum to 1 / G and the scaling restores the dense output. The dense FFN's output bias is added
once per token by moefy's :class:`~brickwork.ops.moefy.OutputBias` (the MoE's shared branch),
never once per chosen expert. :func:`reproduce_dense_` sets a top-k router to exactly that
even choice (the first ``top_k`` experts), which is how the fine-grained conversion is checked.

The router is any registered router, built by :func:`~brickwork.nn.routing.build_router` from
:class:`~brickwork.nn.routing.MoESettings` (the one vocabulary); the experts are a
:class:`~brickwork.nn.routing.GroupedFFNExperts` bank (GLU FFNs too). :func:`upcycle` returns a
converted **copy**; :func:`upcycle_like` rebuilds the structure for loading saved weights.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from brickwork.errors import BrickworkError
from brickwork.nn.ffn import FeedForward
from brickwork.nn.moe import MoE
from brickwork.nn.routing import GroupedFFNExperts, MoESettings, TopKRouter, build_router
from brickwork.nn.stack import StackModel
from brickwork.ops.grow.width import stack_model, sublayers
from brickwork.ops.moefy import OutputBias

_ROUTING = MoESettings()  # frozen: safe to share as a default

#: Router logit given to the experts :func:`reproduce_dense_` leaves out (exp of it is 0 in float32).
OFF_LOGIT = -1e4


def ffn_slices(ffn: FeedForward, parts: int, scale: float = 1.0) -> list[FeedForward]:
    """The FFN's neurons cut into ``parts`` consecutive slices, each a :class:`FeedForward` of
    H / parts neurons whose output projection is multiplied by ``scale`` and has no bias.

    ``sum(slices)(x) + b_down == ffn(x)`` at ``scale`` 1 (the neurons' contributions add up).
    """
    hidden = ffn.up.out_features
    if hidden % parts:
        raise BrickworkError(f"upcycle: {hidden} FFN neurons do not split into granularity {parts}")
    h = hidden // parts
    w = ffn.up.weight
    bias = ffn.up.bias is not None
    out = []
    with torch.no_grad():
        for g in range(parts):
            rows = slice(g * h, (g + 1) * h)
            s = FeedForward(
                ffn.up.in_features, h, ffn.act_name, ffn.gate is not None, bias=bias, device=w.device, dtype=w.dtype
            )
            for mine, theirs in ((s.up, ffn.up), (s.gate, ffn.gate)):
                if mine is not None and theirs is not None:
                    mine.weight.copy_(theirs.weight[rows])
                    if mine.bias is not None and theirs.bias is not None:
                        mine.bias.copy_(theirs.bias[rows])
            s.down.weight.copy_(ffn.down.weight[:, rows] * scale)
            if s.down.bias is not None:
                s.down.bias.zero_()
            out.append(s)
    return out


def upcycle_ffn(
    ffn: FeedForward, num_experts: int, routing: MoESettings = _ROUTING, granularity: int = 1, where: str = "ffn"
) -> MoE:
    """An :class:`MoE` of ``num_experts`` experts made from ``ffn`` (weights copied), with a new router.

    Raises:
        BrickworkError: ``num_experts`` not a multiple of ``granularity``, ``top_k`` above the
            experts, or H not divisible by ``granularity``.
    """
    if granularity < 1 or num_experts % granularity:
        raise BrickworkError(
            f"upcycle: {where}: {num_experts} experts are not a whole number of copies of {granularity} slices"
        )
    if not 1 <= routing.top_k <= num_experts:
        raise BrickworkError(f"upcycle: {where}: top_k must be in [1, {num_experts}], got {routing.top_k}")
    slices = ffn_slices(ffn, granularity, scale=float(granularity))
    experts = [slices[e % granularity] for e in range(num_experts)]  # expert c * G + g is copy c of slice g
    bank = GroupedFFNExperts.from_feed_forward(experts)
    p = ffn.up.weight
    router = build_router(routing, bank.dim, num_experts, bank=bank, device=p.device, dtype=p.dtype)
    shared = OutputBias(ffn.down.bias) if ffn.down.bias is not None else None
    return MoE(bank, router, shared=shared, capacity_factor=routing.capacity_factor)


def _targets(model: StackModel, layers: Sequence[int] | None) -> dict[int, FeedForward]:
    found = sublayers(model, layers, "ffn", FeedForward, "a dense FeedForward", "upcycle")
    return {i: f for i, f in found.items() if isinstance(f, FeedForward)}


def upcycle(
    model: nn.Module,
    num_experts: int = 8,
    routing: MoESettings = _ROUTING,
    granularity: int = 1,
    layers: Sequence[int] | None = None,
    seed: int = 0,
    in_place: bool = False,
) -> StackModel:
    """A copy of ``model`` whose dense FFNs (``layer.ffn`` of the chosen body layers) are upcycled MoEs.

    Args:
        model: a stack model whose body layers have a dense :class:`FeedForward` ``ffn``.
        num_experts: E per layer.
        routing: router name, ``top_k``, balancing, noise, capacity (:class:`MoESettings`).
        granularity: G, slices of each FFN (1: every expert a full copy).
        layers: body layers to convert (default all).
        seed: the new routers' initialisation.
        in_place: edit ``model`` itself.
    """
    out = stack_model(model, "upcycle")
    targets = _targets(out, layers)
    if not in_place:
        out = copy.deepcopy(out)
    torch.manual_seed(seed)
    for i, ffn in _targets(out, list(targets)).items():  # the copy's FFNs
        out.body.layers[i].ffn = upcycle_ffn(ffn, num_experts, routing, granularity, f"body.layers.{i}.ffn")
    return out


def upcycle_recipe(
    num_experts: int, routing: MoESettings, granularity: int = 1, layers: Sequence[int] | None = None
) -> dict[str, Any]:
    """The structural recipe of an upcycling (plain JSON), which :func:`upcycle_like` replays."""
    return {
        "op": "upcycle",
        "experts": num_experts,
        "granularity": granularity,
        "layers": None if layers is None else list(layers),
        "routing": dataclasses.asdict(routing),
    }


def upcycle_like(model: nn.Module, recipe: Mapping[str, Any]) -> StackModel:
    """``model`` (edited in place) with the structure a recorded ``upcycle`` gives, to load weights into."""
    routing = MoESettings(**recipe["routing"])
    return upcycle(model, recipe["experts"], routing, recipe.get("granularity", 1), recipe.get("layers"), in_place=True)


@torch.no_grad()
def reproduce_dense_(moe: MoE) -> MoE:
    """Set a top-k router (in place) to spread every token evenly over experts ``0 .. top_k - 1``.

    Its scorer gets zero weights and a bias of 0 for those experts and :data:`OFF_LOGIT` for the
    rest, so the choice and the weights (1 / top_k each, renormalised or not) are exact. With
    ``top_k`` a multiple of the granularity this is the dense FFN again.
    """
    router = moe.router
    if not isinstance(router, TopKRouter):
        raise BrickworkError(f"reproduce_dense_: needs a top-k router, got {type(router).__name__}")
    proj = router.proj
    new = nn.Linear(proj.in_features, proj.out_features, bias=True, device=proj.weight.device, dtype=proj.weight.dtype)
    new.weight.zero_()
    new.bias.fill_(OFF_LOGIT)
    new.bias[: router.top_k] = 0.0
    router.proj = new
    return moe
