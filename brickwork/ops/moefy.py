"""MoEfication: split every FFN of a trained stack into experts, without new expert parameters.

``FFN(x) = W_down act(W_up x + b_up) + b_down`` is a sum over its H neurons, so grouping the
neurons into E disjoint sets of H/E makes it a sum of E small FFNs (Zhang et al., 2022,
"MoEfication: Transformer Feed-forward Layers are Mixtures of Experts"; Qiu et al., 2024,
EMoE). Computing only the top-k groups per token costs k/E of the FFN's matmuls; top-k = E is
the dense FFN again (up to summation order).

Biases: ``b_up`` belongs to the neurons and moves with them into their expert; ``b_down`` is
added once per token, not once per chosen expert, by an :class:`OutputBias` that the
:class:`~brickwork.nn.moe.MoE` runs as its always-on ``shared`` branch (EMoE's code instead
divides it by k inside every expert, which is exact only while every token has exactly k
experts with weight 1).

Pipeline: collect the FFN inputs of each layer on real text (:func:`ffn_inputs`), partition
the neurons (:mod:`~brickwork.analysis.clustering`), build the router by its registry name
(:mod:`~brickwork.nn.routing.key_routers`; the MLP router trained by
:mod:`~brickwork.ops.moefy_router`), and swap ``layer.ffn`` for the MoE. :func:`moefy` returns
a converted **copy**; the model passed in is not changed. :func:`dense_ffn` turns an MoEfied
FFN back into the exact dense one (the operation is reversible).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Annotated, Any, Literal, cast

import pydantic
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brickwork.analysis.clustering import (
    CutMethod,
    check_partition,
    coactivation_partition,
    kmeans_partition,
    random_partition,
)
from brickwork.kernels import GroupedBackend, grouped_linear
from brickwork.nn.activations import activation
from brickwork.nn.ffn import Activation, FeedForward
from brickwork.nn.modes import evaluating
from brickwork.nn.moe import MoE
from brickwork.nn.routing import KeyRouter, MLPRouter, MoESettings, build_router
from brickwork.nn.stack import StackModel
from brickwork.ops.moefy_router import expert_activation_sums, router_recall, train_mlp_router
from brickwork.registry import register

# ``coactivation`` cuts the co-firing graph with METIS as MoEfication does (spectral cut, with a
# warning, when pymetis is absent); ``coactivation_spectral`` always uses the spectral cut (the
# only co-activation method before issue 14, and the one behind the figures recorded then).
Clustering = Literal["kmeans", "coactivation", "coactivation_spectral", "random"]
# The registered routers built from a neuron bank's keys (``nn/routing/key_routers.py``); any
# other router would start untrained, and the conversion trains none but ``mlp``.
RouterKind = Literal["emoe", "mlp"]


class NeuronExperts(nn.Module):
    """E groups of a dense FFN's neurons as an expert bank (the ``MoE`` experts interface).

    Expert ``e`` computes ``act(x W_in[e] + b_in[e]) W_out[e]`` for its rows; it has no output
    bias (see :class:`OutputBias`). ``neurons[e]`` records which dense neurons it holds.

    Args:
        num_experts: E.
        dim: model width D.
        hidden: neurons per expert H/E.
        act: activation name.
        bias: whether the neurons have an input bias.
        backend: grouped-matmul backend.

    Shapes:
        ``forward(x_sorted (A, D), counts (E,)) -> (A, D)``
    """

    neurons: Tensor

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden: int,
        act: Activation = "gelu",
        bias: bool = True,
        backend: GroupedBackend = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.num_experts, self.dim, self.hidden, self.act_name, self.backend = num_experts, dim, hidden, act, backend
        self.act = activation(act)
        self.w_in = nn.Parameter(torch.zeros(num_experts, dim, hidden, **kw))
        self.b_in = nn.Parameter(torch.zeros(num_experts, hidden, **kw)) if bias else None
        self.w_out = nn.Parameter(torch.zeros(num_experts, hidden, dim, **kw))
        self.register_buffer("neurons", torch.arange(num_experts * hidden, device=device).reshape(num_experts, hidden))

    @classmethod
    def from_ffn(cls, ffn: FeedForward, partition: Tensor, backend: GroupedBackend = "auto") -> NeuronExperts:
        """The neurons of ``ffn`` grouped by ``partition`` (E, H/E); weights copied."""
        if ffn.gate is not None:
            raise ValueError("moefy: gated (GLU) FFNs are not supported; split FeedForward(glu=False) layers")
        check_partition(partition, ffn.up.out_features)
        w = ffn.up.weight
        bank = cls(
            partition.shape[0],
            ffn.up.in_features,
            partition.shape[1],
            ffn.act_name,
            ffn.up.bias is not None,
            backend,
            device=w.device,
            dtype=w.dtype,
        )
        p = partition.to(w.device)
        with torch.no_grad():
            bank.w_in.copy_(ffn.up.weight[p].transpose(1, 2))  # (E, H/E, D) -> (E, D, H/E)
            bank.w_out.copy_(ffn.down.weight.t()[p])  # (E, H/E, D)
            if bank.b_in is not None:
                bank.b_in.copy_(ffn.up.bias[p])
            bank.neurons.copy_(p)
        return bank

    def forward(self, x_sorted: Tensor, counts: Tensor) -> Tensor:
        h = self.act(grouped_linear(x_sorted, self.w_in, counts, self.b_in, backend=self.backend))
        return grouped_linear(h, self.w_out, counts, None, backend=self.backend)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, dim={self.dim}, hidden={self.hidden}, act={self.act_name}"


class OutputBias(nn.Module):
    """The FFN's down-projection bias, added once per token (an MoE's always-on ``shared`` branch).

    Shapes:
        (..., D) -> (..., D) (the bias, broadcast; no matmul, so no FLOPs)
    """

    def __init__(self, bias: Tensor) -> None:
        super().__init__()
        self.bias = nn.Parameter(bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        # A view of a parameter taken under no_grad is a grad-requiring leaf without an
        # accumulator, which FlopCounterMode's module tracker rejects: detach it there.
        bias = self.bias if torch.is_grad_enabled() else self.bias.detach()
        return bias.expand_as(x)


def moefy_ffn(
    ffn: FeedForward, partition: Tensor, router: RouterKind, top_k: int, backend: GroupedBackend = "auto"
) -> MoE:
    """An :class:`MoE` computing ``ffn`` with its neurons grouped by ``partition`` (E, H/E), ``top_k``
    experts per token chosen by an untrained ``router`` (:func:`make_router`); weights copied."""
    bank = NeuronExperts.from_ffn(ffn, partition, backend)
    shared = OutputBias(ffn.down.bias) if ffn.down.bias is not None else None
    return MoE(bank, make_router(bank, router, top_k), shared=shared)


def dense_ffn(moe: MoE) -> FeedForward:
    """The dense :class:`FeedForward` an MoEfied FFN came from, neurons in their original order."""
    bank = moe.experts
    if not isinstance(bank, NeuronExperts):
        raise TypeError(f"dense_ffn: {type(bank).__name__} is not a NeuronExperts bank")
    hidden = bank.num_experts * bank.hidden
    p = bank.w_in
    ffn = FeedForward(bank.dim, hidden, bank.act_name, bias=bank.b_in is not None, device=p.device, dtype=p.dtype)
    idx = bank.neurons.flatten()
    with torch.no_grad():
        ffn.up.weight[idx] = bank.w_in.transpose(1, 2).reshape(hidden, bank.dim)
        ffn.down.weight[:, idx] = bank.w_out.reshape(hidden, bank.dim).t()
        if bank.b_in is not None:
            ffn.up.bias[idx] = bank.b_in.reshape(hidden)
        if ffn.down.bias is not None:
            if isinstance(moe.shared, OutputBias):
                ffn.down.bias.copy_(moe.shared.bias)
            else:
                ffn.down.bias.zero_()
    return ffn


def _ffns(model: StackModel, layers: Sequence[int] | None) -> dict[int, FeedForward]:
    chosen = range(len(model.body)) if layers is None else [i % len(model.body) for i in layers]
    out = {}
    for i in chosen:
        ffn = getattr(model.body.layers[i], "ffn", None)
        if not isinstance(ffn, FeedForward):
            raise ValueError(f"moefy: body layer {i} has no FeedForward `ffn` (found {type(ffn).__name__})")
        out[i] = ffn
    return out


@torch.no_grad()
def ffn_inputs(
    model: StackModel, batches: Iterable[Tensor], layers: Sequence[int] | None = None, max_tokens: int = 16384
) -> dict[int, Tensor]:
    """(N, D) inputs that each chosen layer's ``ffn`` receives on ``batches``, at most ``max_tokens``.

    Pass padding-free batches (:func:`brickwork.data.sentences.token_batches`) so that padded
    positions are not counted as text.
    """
    ffns = _ffns(model, layers)
    seen: dict[int, list[Tensor]] = {i: [] for i in ffns}
    hooks = [
        f.register_forward_hook(lambda _m, args, _o, i=i: seen[i].append(args[0].reshape(-1, args[0].shape[-1])))
        for i, f in ffns.items()
    ]
    with evaluating(model):
        try:
            total = 0
            for x in batches:
                model(x)
                total = sum(len(t) for t in seen[next(iter(seen))])
                if total >= max_tokens:
                    break
        finally:
            for h in hooks:
                h.remove()
    return {i: torch.cat(v)[:max_tokens] for i, v in seen.items()}


def partition_ffn(
    ffn: FeedForward, num_experts: int, clustering: Clustering, x: Tensor | None, seed: int = 0
) -> Tensor:
    """(E, H/E) neuron groups of ``ffn`` by ``clustering``; co-activation needs its inputs ``x`` (N, D)."""
    hidden = ffn.up.out_features
    if hidden % num_experts:
        raise ValueError(f"moefy: {hidden} neurons do not split into {num_experts} equal experts")
    if clustering == "kmeans":
        return kmeans_partition(ffn.up.weight, num_experts, seed)
    if clustering == "random":
        return random_partition(hidden, num_experts, seed)
    if x is None:
        raise ValueError("moefy: co-activation clustering needs calibration text")
    method: CutMethod = "spectral" if clustering == "coactivation_spectral" else "metis"
    return coactivation_partition(F.linear(x, ffn.up.weight, ffn.up.bias) > 0, num_experts, seed, method)


def make_router(bank: NeuronExperts, kind: RouterKind, top_k: int) -> nn.Module:
    """An untrained router for ``bank``, by registry name: EMoE's avg-k gate (``emoe``), or
    MoEfication's MLP router (``mlp``) at its key initialisation."""
    w = bank.w_in
    return build_router(
        MoESettings(top_k=top_k, router=kind), bank.dim, bank.num_experts, bank=bank, device=w.device, dtype=w.dtype
    )


@register("op", "moefy")
def moefy(
    model: StackModel,
    batches: Iterable[Tensor] | None = None,
    /,
    num_experts: Annotated[int, pydantic.Field(ge=1)] = 16,
    top_k: Annotated[int, pydantic.Field(ge=1)] = 4,
    clustering: Clustering = "kmeans",
    router: RouterKind = "emoe",
    layers: list[int] | None = None,
    max_tokens: Annotated[int, pydantic.Field(ge=64)] = 16384,
    router_epochs: Annotated[int, pydantic.Field(ge=1)] = 10,
    seed: int = 0,
) -> tuple[StackModel, dict[int, dict[str, float]]]:
    """A copy of ``model`` whose FFNs are mixtures of ``num_experts`` neuron groups, ``top_k`` per token.

    Args:
        model: a stack model whose body layers have a :class:`FeedForward` ``ffn``; not changed.
        batches: real model inputs, padding-free (needed for ``coactivation`` and ``mlp``).
        num_experts: E; must divide the FFN width.
        top_k: experts computed per token (E reproduces the dense model).
        clustering: ``kmeans`` (parameter clustering), ``coactivation`` (on ``batches``; METIS
            cut), ``coactivation_spectral`` (spectral cut), ``random``.
        router: ``emoe`` (training-free avg-k gate) or ``mlp`` (MoEfication's router, trained on
            ``batches`` to predict each expert's positive activation sum).
        layers: body layers to convert (default: all).
        max_tokens: calibration tokens per layer.
        router_epochs: epochs of MLP-router training.
        seed: clustering initialisation and router training.

    Returns:
        The converted copy and, per converted layer, router statistics when ``batches`` were
        given: ``recall``, the share of the top-k experts by positive activation sum that the
        router picks (for ``mlp`` on a held-out 10% of the tokens, with ``recall_keys`` of its
        key initialisation beside it).
    """
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"moefy: top_k must be in [1, {num_experts}], got {top_k}")
    ffns = _ffns(model, layers)
    need_text = clustering.startswith("coactivation") or router == "mlp"
    if need_text and batches is None:
        raise ValueError(f"moefy: clustering={clustering!r}, router={router!r} need calibration batches of real text")
    inputs = ffn_inputs(model, batches, list(ffns), max_tokens) if batches is not None else {}
    out = copy.deepcopy(model)  # one deepcopy keeps bricks that share state (padding masks) shared
    stats: dict[int, dict[str, float]] = {}
    for i, ffn in ffns.items():
        x = inputs.get(i)
        partition = partition_ffn(ffn, num_experts, clustering, x, seed)
        moe = moefy_ffn(ffn, partition, router, top_k)
        stats[i] = {}
        if x is not None:
            with torch.no_grad():
                target = expert_activation_sums(x, ffn.up.weight, ffn.up.bias, partition, ffn.act)
            if isinstance(moe.router, MLPRouter):
                stats[i] = train_mlp_router(moe.router, x, target, epochs=router_epochs, seed=seed)
            else:
                with torch.no_grad():
                    # router "emoe" (the other RouterKind): make_router built a KeyRouter
                    keys = cast(KeyRouter, moe.router).keys()
                    stats[i] = {"recall": router_recall(x @ keys.t(), target, top_k)}
        out.body.layers[i].ffn = moe
    return out, stats


def moe_layers(model: nn.Module) -> list[MoE]:
    """The MoEfied FFNs of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, MoE) and isinstance(m.experts, NeuronExperts)]


def set_top_k(model: nn.Module, top_k: int) -> None:
    """Change (in place) how many experts every MoEfied FFN of ``model`` computes per token."""
    for moe in moe_layers(model):
        if not 1 <= top_k <= moe.num_experts:
            raise ValueError(f"set_top_k: top_k must be in [1, {moe.num_experts}], got {top_k}")
        # a MoEfied FFN's router comes from make_router: one of the RouterKinds
        cast(KeyRouter | MLPRouter, moe.router).top_k = top_k


def moefy_like(
    model: StackModel, num_experts: int, top_k: int, router: RouterKind, layers: Sequence[int] | None = None
) -> StackModel:
    """A copy of ``model`` with the structure :func:`moefy` gives (random partition, untrained router),
    into which the state dict of a converted model loads: rebuilding a saved conversion."""
    ffns = _ffns(model, layers)
    out = copy.deepcopy(model)
    for i, ffn in ffns.items():
        out.body.layers[i].ffn = moefy_ffn(ffn, random_partition(ffn.up.out_features, num_experts), router, top_k)
    return out
