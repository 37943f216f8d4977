"""Auxiliary router losses: Switch/GShard load balancing and the ST-MoE router z-loss.

Both are returned unweighted; the training loop weights them by name from the config
(typical weights: ``load_balance`` 1e-2 as in Switch Transformer, ``z_loss`` 1e-3 as in ST-MoE).
"""

from __future__ import annotations

import torch
from torch import Tensor

from brickwork.nn.routing.types import router_precision


def load_balance_loss(probs: Tensor, expert_idx: Tensor, num_experts: int) -> Tensor:
    """Switch/GShard load-balancing loss ``E * sum_i f_i * P_i``.

    ``f_i`` is the fraction of *assignments* dispatched to expert ``i``, counted from the
    discrete routing decision over all k slots (``count_i / (tokens * k)``), so it carries no
    gradient; ``P_i`` is the mean router probability of expert ``i`` over tokens, which carries
    it. The factor ``E`` makes the loss 1 under perfectly uniform routing whatever E is
    (Fedus et al., 2021, eq. 4; Lepikhin et al., 2020). Pitfalls of popular implementations
    that this avoids: computing ``f`` from probabilities (it then pushes towards uniform
    probabilities, not uniform load), and dropping the factor ``E``.

    Args:
        probs: (N, E) router probabilities per token (rows sum to 1).
        expert_idx: (A,) or (N, k) experts chosen by the routing decision (before any
            capacity dropping, as in Switch).
        num_experts: E.

    Returns:
        Scalar loss, minimum 1 at uniform load and uniform mean probability.
    """
    counts = torch.bincount(expert_idx.reshape(-1), minlength=num_experts)
    f = counts.to(probs.dtype) / max(expert_idx.numel(), 1)
    p = probs.mean(dim=0)
    return num_experts * torch.sum(f * p)


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean over tokens of ``logsumexp(logits)^2`` (Zoph et al., 2022, eq. 5).

    Penalises large router logits, which cause round-off errors in the exponentials of the
    softmax and make training unstable.

    Args:
        logits: (N, E) router logits.
    """
    return torch.logsumexp(router_precision(logits), dim=-1).square().mean()
