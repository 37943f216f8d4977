"""Mixture-of-experts layer: a router, a bank of experts, optionally a shared expert.

Drops in wherever a :class:`~brickwork.nn.ffn.FeedForward` goes: (..., D) -> (..., D). The
forward returns a tensor only; the routing decision is left on the module as ``record``
(:class:`~brickwork.nn.routing.types.RoutingRecord`) and the router's auxiliary losses as
``aux_losses`` (see :mod:`brickwork.nn.records`).

Execution: the router's assignments are sorted by expert once (:func:`plan_dispatch`), the
tokens gathered into that order in one ``index_select``, the experts run on contiguous rows
(one grouped matmul per projection for :class:`GroupedFFNExperts`, one call per expert for a
list of arbitrary modules), outputs are scaled by the combine weights and summed back per
token with one ``index_add``. Measured on the CPU against the dense FFN of equal active FLOPs
and against the loop-over-experts design in ``docs/moe-notes.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, cast

import pydantic
import torch
from torch import Tensor, nn

from brickwork.kernels import GroupedBackend
from brickwork.nn.ffn import Activation, FeedForward
from brickwork.nn.permutation import Axis, Perm, Symmetry
from brickwork.nn.routing.dense_to_sparse import DenseToSparseRouter
from brickwork.nn.routing.dispatch import Priority, plan_dispatch
from brickwork.nn.routing.expert_choice import ExpertChoiceRouter
from brickwork.nn.routing.experts import ExpertList, GroupedFFNExperts
from brickwork.nn.routing.settings import MoESettings, build_router
from brickwork.nn.routing.topk import TopKRouter
from brickwork.nn.routing.types import Routing, RoutingRecord
from brickwork.registry import Flatten, register


def route(router: nn.Module, x: Tensor, num_experts: int) -> tuple[Tensor, Routing]:
    """``x`` (..., D) flattened to (N, D), and the router's decision on it, checked against the bank's E."""
    routing: Routing = router(x)
    if routing.num_experts != num_experts:
        raise ValueError(f"MoE: router routes to {routing.num_experts} experts, the bank has {num_experts}")
    return x.reshape(-1, x.shape[-1]), routing


@register("brick", "moe")
class MoE(nn.Module):
    """Routed mixture of experts.

    Args:
        experts: a bank taking ``(x_sorted, counts)`` (e.g. :class:`GroupedFFNExperts`, the fast
            path), or a sequence of E arbitrary modules (n, D) -> (n, D) (the generic path).
        router: any router returning a :class:`~brickwork.nn.routing.types.Routing` for E experts.
        shared: an always-on expert added for every token (DeepSeekMoE, Dai et al., 2024;
            wrap it in :class:`GatedExpert` for Qwen-MoE's sigmoid-gated form).
        capacity_factor: None for dropless execution; otherwise each expert processes at most
            ``ceil(capacity_factor * assignments / E)`` rows and the overflow is dropped
            (zero expert output: the residual carries those tokens).
        priority: which assignments win a full expert (``"position"``, ``"slot"``, ``"weight"``;
            see :mod:`brickwork.nn.routing.dispatch`).

    Shapes:
        (..., D) -> (..., D)
    """

    def __init__(
        self,
        experts: nn.Module | Sequence[nn.Module],
        router: nn.Module,
        shared: nn.Module | None = None,
        capacity_factor: Annotated[float, pydantic.Field(gt=0)] | None = None,
        priority: Priority = "slot",
    ) -> None:
        super().__init__()
        if isinstance(experts, (list, tuple, nn.ModuleList)) and not isinstance(experts, ExpertList):
            experts = ExpertList(experts)
        bank = cast(nn.Module, experts)  # the sequence forms were wrapped in an ExpertList just above
        self.experts = bank
        self.router = router
        self.shared = shared
        self.capacity_factor = capacity_factor
        self.priority: Priority = priority
        # ``num_experts`` is part of the bank's contract; Module.__getattr__ would type it Tensor | Module.
        self.num_experts = int(cast(int, bank.num_experts))
        self.aux_losses: dict[str, Tensor] = {}
        self.record: RoutingRecord | None = None

    def forward(self, x: Tensor) -> Tensor:
        lead, d = x.shape[:-1], x.shape[-1]
        flat, routing = route(self.router, x, self.num_experts)
        plan = plan_dispatch(routing, self.capacity_factor, self.priority)
        rows = flat.index_select(0, plan.token_idx)  # one gather into expert-contiguous order
        y = self.experts(rows, plan.counts) * plan.weights.unsqueeze(-1).to(flat.dtype)
        out = torch.zeros_like(flat).index_add(0, plan.token_idx, y)  # one scatter-add back per token
        if self.shared is not None:
            out = out + self.shared(flat)
        self.aux_losses = routing.aux_losses
        self.record = RoutingRecord.of(routing, tuple(lead), plan.kept, plan.counts, plan.capacity)
        return out.reshape(*lead, d)

    def permutation_symmetry(self) -> Symmetry:
        """Expert order moves the bank and the router's rows together; the bank's ends and the shared expert's follow.

        Routers whose parameters are known to be one row per expert (``topk``, ``sigmoid``,
        ``expert_choice``, ``dense_to_sparse``: a linear scorer, plus the selection bias) follow
        the expert permutation. Any other router (hash, key or MLP routers) is fixed: the expert
        order and the layer's input then stay as they are (hidden units inside experts still move).
        """
        children: dict[str, dict[str, str]] = {"experts": {"in": "in", "out": "out"}}
        if self.shared is not None:
            children["shared"] = {"in": "in", "out": "out"}
        r = self.router
        perms = {"in": Perm(0), "out": Perm(0), "experts": Perm(self.num_experts)}
        if not isinstance(r, (TopKRouter, ExpertChoiceRouter, DenseToSparseRouter)):
            perms["in"] = Perm(0, fixed=True)
            return Symmetry(perms, inputs="in", output="out", children=children)
        children["experts"]["experts"] = "experts"
        axes = [Axis("router.proj.weight", 0, "experts"), Axis("router.proj.weight", 1, "in")]
        if r.proj.bias is not None:
            axes.append(Axis("router.proj.bias", 0, "experts"))
        if isinstance(r, TopKRouter) and r.noise_proj is not None:
            axes += [Axis("router.noise_proj.weight", 0, "experts"), Axis("router.noise_proj.weight", 1, "in")]
        if getattr(r, "selection_bias", None) is not None:
            axes += [
                Axis("router.selection_bias.bias", 0, "experts"),
                Axis("router.selection_bias.pending_load", 0, "experts"),
            ]
        return Symmetry(perms, axes, inputs="in", output="out", children=children)

    def extra_repr(self) -> str:
        cap = "dropless" if self.capacity_factor is None else f"capacity_factor={self.capacity_factor}"
        return f"num_experts={self.num_experts}, {cap}, priority={self.priority}"


@register("brick", "gated_expert")
class GatedExpert(nn.Module):
    """``sigmoid(x w) * expert(x)``: a shared expert with a learned scalar gate (Qwen1.5/2-MoE).

    Args:
        expert: any module (..., D) -> (..., D).
        dim: input width D.

    Shapes:
        (..., D) -> (..., D)
    """

    def __init__(
        self,
        expert: nn.Module,
        dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.expert = expert
        self.gate = nn.Linear(dim, 1, bias=False, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.gate(x)) * self.expert(x)

    def permutation_symmetry(self) -> Symmetry:
        """The gate's input columns follow the input permutation; the expert's own symmetry inside."""
        axes = [Axis("gate.weight", 1, "in")]
        children = {"expert": {"in": "in", "out": "out"}}
        return Symmetry({"in": Perm(0), "out": Perm(0)}, axes, inputs="in", output="out", children=children)


_ROUTING = MoESettings()  # frozen: safe to share as a default


@register("brick", "moe_ffn")
def moe_ffn(
    dim: int,
    hidden: int,
    num_experts: Annotated[int, pydantic.Field(ge=1)],
    routing: Annotated[MoESettings, Flatten] = _ROUTING,
    act: Activation = "gelu",
    glu: bool = False,
    bias: bool = False,
    shared_hidden: Annotated[int, pydantic.Field(ge=0)] = 0,
    shared_gated: bool = False,
    backend: GroupedBackend = "auto",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> MoE:
    """Mixture-of-experts FFN from flat arguments: stacked FFN experts plus a router named in the registry.

    Args:
        dim: model width D.
        hidden: inner width H of each expert (fine-grained experts: a fraction of a dense FFN's).
        num_experts: E.
        routing: router, top-k, balancing, noise and capacity (:class:`MoESettings`; in a config
            its fields are keys of their own). ``routing.router`` is any registered router
            (``brickwork ls router``): ``topk`` (softmax then top-k, renormalised), ``sigmoid``
            (DeepSeek-V3 sigmoid affinities), ``expert_choice``, ``hash`` (input LSH),
            ``dense_to_sparse`` (EvoMoE), ``activation_dense_to_sparse`` (Nguyen et al., 2024;
            tanh), ``emoe`` (avg-k gate on the experts' keys) or ``mlp`` (MoEfication's router;
            it gets no task gradient, so here it stays at its initialisation).
        act: expert activation; glu: gated experts; bias: expert biases.
        shared_hidden: > 0 adds an always-on shared FFN expert of this inner width.
        shared_gated: gate the shared expert with a sigmoid (Qwen-MoE).
        backend: grouped-matmul backend.

    Raises:
        ConfigError: an unknown router name, or a setting the router does not use that is not
            at its default (:meth:`MoESettings.check`).

    Shapes:
        (..., D) -> (..., D)
    """
    kw: dict[str, Any] = {"device": device, "dtype": dtype}
    experts = GroupedFFNExperts(num_experts, dim, hidden, act, glu, bias, backend, **kw)
    router = build_router(routing, dim, num_experts, bank=experts, **kw)
    shared: nn.Module | None = None
    if shared_hidden > 0:
        shared = FeedForward(dim, shared_hidden, act, glu, bias=bias, **kw)
        if shared_gated:
            shared = GatedExpert(shared, dim, **kw)
    return MoE(experts, router, shared=shared, capacity_factor=routing.capacity_factor)
