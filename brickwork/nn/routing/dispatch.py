"""From a router's assignments to expert-contiguous rows: sorting, capacity and dropping.

Tokens are permuted once so that each expert's rows are contiguous (then experts run on
views, or one grouped matmul runs them all), instead of gathering the full token set per
expert as loop-over-experts implementations do.

Capacity (Lepikhin et al., 2020; Fedus et al., 2021): each expert processes at most
``C = ceil(capacity_factor * A / E)`` of the A assignments; the rest are dropped, and a token
whose assignments are all dropped gets zero expert output, so the residual connection around
the layer carries it unchanged. Which assignments win a full expert is the *priority*:

* ``"position"``: earlier tokens first (Switch Transformer);
* ``"slot"``: all first choices before any second choice, then by position (GShard's top-2);
* ``"weight"``: highest router weight first (batch-prioritised routing, Riquelme et al., 2021).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from brickwork.nn.routing.types import Routing

Priority = Literal["position", "slot", "weight"]


@dataclass
class DispatchPlan:
    """Kept assignments sorted by expert.

    Attributes:
        order: (A_kept,) indices into the router's assignments, grouped by expert.
        token_idx: (A_kept,) token of each sorted row.
        weights: (A_kept,) combine weight of each sorted row (keeps the router's graph).
        counts: (E,) rows per expert; sums to A_kept.
        kept: (A,) bool over the router's assignments.
        capacity: per-expert capacity in force, None when dropless.
    """

    order: Tensor
    token_idx: Tensor
    weights: Tensor
    counts: Tensor
    kept: Tensor
    capacity: int | None


def expert_capacity(num_assignments: int, num_experts: int, capacity_factor: float) -> int:
    """``ceil(capacity_factor * A / E)``, at least 1."""
    return max(1, math.ceil(capacity_factor * num_assignments / num_experts))


def plan_dispatch(routing: Routing, capacity_factor: float | None = None, priority: Priority = "slot") -> DispatchPlan:
    """Sort the assignments by expert and apply the capacity limit.

    Args:
        routing: the router's decision.
        capacity_factor: None for dropless execution; otherwise the capacity factor.
        priority: which assignments are kept when an expert is full (see module docstring).
    """
    e = routing.expert_idx
    n_exp = routing.num_experts
    a = e.numel()
    counts_all = torch.bincount(e, minlength=n_exp)
    if capacity_factor is None:
        order = torch.argsort(e, stable=True)  # stable: each expert's rows stay in token order
        kept = torch.ones(a, dtype=torch.bool, device=e.device)
        return DispatchPlan(order, routing.token_idx[order], routing.weights[order], counts_all, kept, None)

    cap = expert_capacity(a, n_exp, capacity_factor)
    pre = _priority_order(routing, priority)
    order = pre[torch.argsort(e[pre], stable=True)]
    starts = torch.cumsum(counts_all, 0) - counts_all
    position = torch.arange(a, device=e.device) - starts[e[order]]
    order = order[position < cap]
    kept = torch.zeros(a, dtype=torch.bool, device=e.device)
    kept[order] = True
    counts = counts_all.clamp(max=cap)
    return DispatchPlan(order, routing.token_idx[order], routing.weights[order], counts, kept, cap)


def _priority_order(routing: Routing, priority: Priority) -> Tensor:
    a = routing.num_assignments
    device = routing.expert_idx.device
    if priority == "weight":
        return torch.argsort(routing.weights.detach(), descending=True, stable=True)
    if priority == "slot" and routing.top_k is not None and routing.top_k > 1:
        # Token-major (N, k) -> slot-major: every token's first choice precedes any second choice.
        return torch.arange(a, device=device).view(routing.num_tokens, routing.top_k).t().reshape(-1)
    return torch.arange(a, device=device)
