"""What a router returns and what a routed layer records.

Every router, whatever its family (token choice, expert choice, hash, dense-to-sparse),
returns its decision in one form: a flat list of (token, expert, weight) *assignments*.
Token choice gives ``N * k`` of them in token-major order, expert choice ``E * C``, a
dense-to-sparse gate a variable number. One form keeps the dispatcher, the capacity logic,
the record and the analysis independent of the router family.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


def router_precision(t: Tensor) -> Tensor:
    """``t`` in at least float32 for router math (softmax, sigmoid, logsumexp are sensitive to
    round-off): half-precision logits are upcast, float64 ones stay float64 (so a float64 model
    is float64 throughout, as exactness tests need)."""
    return t if t.dtype == torch.float64 else t.float()


@dataclass
class Routing:
    """A router's decision for N tokens over E experts.

    Attributes:
        token_idx: (A,) int64 token of each assignment, in ``[0, N)``.
        expert_idx: (A,) int64 expert of each assignment, in ``[0, E)``.
        weights: (A,) combine weight of each assignment (differentiable w.r.t. the router).
        num_tokens: N, tokens after flattening the leading dims.
        num_experts: E.
        probs: (N, E) router probability of every expert per token (rows sum to 1), or None
            for parameter-free routers. Used for the balancing loss, entropy and analysis.
        logits: (N, E) raw router logits (for the z-loss), or None.
        top_k: k when every token has exactly k assignments in token-major order
            (``token_idx == arange(N).repeat_interleave(k)``); None otherwise.
        aux_losses: unweighted scalar auxiliary losses computed by the router
            (``"load_balance"``, ``"z_loss"``); empty in eval mode.
        aux_sums: for a loss that is a function of a per-expert sum over the tokens (Shazeer et
            al.'s ``"importance"`` and ``"load"``: ``CV^2`` of an (E,) sum), that (E,) sum, so the
            loss over a larger batch is the same function of the summed vectors (expert
            parallelism computes it over the global batch this way).
    """

    token_idx: Tensor
    expert_idx: Tensor
    weights: Tensor
    num_tokens: int
    num_experts: int
    probs: Tensor | None = None
    logits: Tensor | None = None
    top_k: int | None = None
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    aux_sums: dict[str, Tensor] = field(default_factory=dict)

    @property
    def num_assignments(self) -> int:
        return int(self.token_idx.numel())


def token_choice_routing(
    top_idx: Tensor,
    top_weights: Tensor,
    num_experts: int,
    *,
    probs: Tensor | None = None,
    logits: Tensor | None = None,
    aux_losses: dict[str, Tensor] | None = None,
    aux_sums: dict[str, Tensor] | None = None,
) -> Routing:
    """A :class:`Routing` from per-token top-k choices.

    Args:
        top_idx: (N, k) chosen experts per token.
        top_weights: (N, k) their combine weights.
        num_experts: E.
        probs: optional (N, E) router probabilities.
        logits: optional (N, E) router logits.
        aux_losses: optional auxiliary losses.
        aux_sums: optional (E,) per-expert sums the losses are made of (:class:`Routing`).
    """
    n, k = top_idx.shape
    token_idx = torch.arange(n, device=top_idx.device).repeat_interleave(k)
    return Routing(
        token_idx=token_idx,
        expert_idx=top_idx.reshape(-1),
        weights=top_weights.reshape(-1),
        num_tokens=n,
        num_experts=num_experts,
        probs=probs,
        logits=logits,
        top_k=k,
        aux_losses=aux_losses or {},
        aux_sums=aux_sums or {},
    )


@dataclass
class RoutingRecord:
    """What a routed layer decided in its latest forward (detached; no graph is kept).

    The assignment tensors are kept per token so that :mod:`brickwork.analysis.routing` can
    relate routing to labels (expert specialisation) after the fact.

    Attributes:
        num_tokens: N tokens routed.
        num_experts: E.
        leading_shape: the input's leading dims (e.g. (B, T)), whose product is N; token ``i``
            of the flattened input belongs to sample ``i // (N // B)``.
        token_idx: (A,) token of every assignment the router made.
        expert_idx: (A,) expert of every assignment.
        weights: (A,) combine weights.
        kept: (A,) bool, False where the assignment was dropped by the capacity limit.
        load: (E,) int64 assignments each expert processed (kept ones).
        capacity: per-expert capacity in force, or None when dropless.
        probs: (N, E) router probabilities, or None (hash routing).
    """

    num_tokens: int
    num_experts: int
    leading_shape: tuple[int, ...]
    token_idx: Tensor
    expert_idx: Tensor
    weights: Tensor
    kept: Tensor
    load: Tensor
    capacity: int | None = None
    probs: Tensor | None = None

    @classmethod
    def of(
        cls, routing: Routing, leading_shape: tuple[int, ...], kept: Tensor, load: Tensor, capacity: int | None = None
    ) -> RoutingRecord:
        """The record of ``routing`` as a routed layer executed it (tensors detached)."""
        return cls(
            num_tokens=routing.num_tokens,
            num_experts=routing.num_experts,
            leading_shape=tuple(leading_shape),
            token_idx=routing.token_idx.detach(),
            expert_idx=routing.expert_idx.detach(),
            weights=routing.weights.detach(),
            kept=kept,
            load=load.detach(),
            capacity=capacity,
            probs=None if routing.probs is None else routing.probs.detach(),
        )

    @property
    def dropped(self) -> int:
        """Assignments dropped by the capacity limit."""
        return int((~self.kept).sum())

    @property
    def drop_rate(self) -> float:
        """Fraction of assignments dropped (0 when dropless)."""
        total = self.kept.numel()
        return self.dropped / total if total else 0.0

    @property
    def unrouted_tokens(self) -> int:
        """Tokens that no expert processed (all their assignments dropped, or none made)."""
        served = torch.zeros(self.num_tokens, dtype=torch.bool, device=self.kept.device)
        served[self.token_idx[self.kept]] = True
        return int((~served).sum())

    @property
    def load_fraction(self) -> Tensor:
        """(E,) fraction of the processed assignments that went to each expert."""
        load = self.load.double()
        return load / load.sum().clamp_min(1)

    @property
    def entropy(self) -> float | None:
        """Mean over tokens of the router distribution's entropy, in nats (None without probs)."""
        if self.probs is None:
            return None
        p = self.probs.double().clamp_min(1e-30)
        return float(-(p * p.log()).sum(-1).mean())
