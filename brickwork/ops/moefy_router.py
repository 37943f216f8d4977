"""Routers for an FFN split into experts: which neuron groups to compute for each token.

Both choose the top-k experts per token and combine them with weight 1: an FFN's output is the
plain sum of its neurons' contributions, so a chosen expert contributes exactly what its
neurons contribute in the dense FFN, and top-k = E reproduces the dense FFN.

* :class:`KeyRouter`: EMoE's training-free avg-k gate (Qiu et al., 2024, "Unlocking Emergent
  Modularity in Large Language Models"): ``score_e = x . mean_{i in e} W_up[i]``, softmax, top-k,
  with EMoE's "one score" combination (weights 1). The mean key is recomputed from the expert
  bank's current weights at every forward, so the gate follows the keys when the model is
  fine-tuned and adds no parameter.
* :class:`MLPRouter`: MoEfication's learned router (Zhang et al., 2022): ``W2 tanh(W1 x/|x|)``
  with ``W1`` initialised to the experts' mean normalised key and ``W2`` to the identity, trained
  (:func:`train_mlp_router`) to predict, per token, each expert's sum of positive activations
  (binary cross-entropy on targets scaled to [0, 1]), as in MoEfication's released code.

They are built from a dense FFN by :func:`brickwork.ops.moefy.moefy`, so they are not registered
as config routers. Neither emits an auxiliary loss: they are not trained through the task loss (the
weights are constant 1, so no gradient reaches them).
"""

from __future__ import annotations

import copy
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brickwork.nn.routing.types import Routing, token_choice_routing


class KeyBank(Protocol):
    """An expert bank that exposes its experts' input weights as ``w_in`` (E, D, H/E)."""

    w_in: Tensor


def _top_k_ones(scores: Tensor, top_k: int, probs: Tensor | None, logits: Tensor | None) -> Routing:
    top_idx = torch.topk(scores, top_k, dim=-1).indices  # (N, k)
    weights = torch.ones(top_idx.shape, dtype=scores.dtype, device=scores.device)
    return token_choice_routing(top_idx, weights, scores.shape[-1], probs=probs, logits=logits)


class KeyRouter(nn.Module):
    """EMoE avg-k gate: top-k experts by ``x . mean key``, combined with weight 1.

    Args:
        bank: the expert bank whose ``w_in`` (E, D, H/E) holds each expert's keys (columns).
        top_k: experts per token.

    Shapes:
        (..., D) -> :class:`Routing` with ``top_k`` assignments per token.
    """

    def __init__(self, bank: KeyBank, top_k: int) -> None:
        super().__init__()
        num_experts = bank.w_in.shape[0]
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"KeyRouter: top_k must be in [1, {num_experts}], got {top_k}")
        self._bank = [bank]  # a list hides the bank from module traversal: the MoE owns it
        self.num_experts = num_experts
        self.top_k = top_k

    def keys(self) -> Tensor:
        """(E, D) mean key of every expert, from the bank's current weights."""
        return self._bank[0].w_in.mean(dim=2)

    def forward(self, x: Tensor) -> Routing:
        x = x.reshape(-1, x.shape[-1])
        logits = (x @ self.keys().t()).float()  # (N, E): one small matmul, counted as router FLOPs
        probs = torch.softmax(logits, dim=-1)
        return _top_k_ones(logits, self.top_k, probs, logits)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}, gate=avg-k keys, weights=1"


class MLPRouter(nn.Module):
    """MoEfication's MLP router: ``W2 tanh(W1 x / |x|)``, top-k experts combined with weight 1.

    Args:
        dim: input width D.
        num_experts: E.
        top_k: experts per token.

    Shapes:
        (..., D) -> :class:`Routing` with ``top_k`` assignments per token.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"MLPRouter: top_k must be in [1, {num_experts}], got {top_k}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.w1 = nn.Linear(dim, num_experts, bias=False, device=device, dtype=dtype)
        self.w2 = nn.Linear(num_experts, num_experts, bias=False, device=device, dtype=dtype)

    def init_from_keys(self, keys: Tensor) -> None:
        """``W1`` = the experts' mean normalised keys (E, D), ``W2`` = identity (MoEfication's init)."""
        with torch.no_grad():
            self.w1.weight.copy_(keys)
            self.w2.weight.copy_(torch.eye(self.num_experts))

    def scores(self, x: Tensor) -> Tensor:
        """(N, E) predicted expert scores (logits of the expert's scaled activation sum)."""
        return self.w2(torch.tanh(self.w1(F.normalize(x, dim=-1))))

    def forward(self, x: Tensor) -> Routing:
        logits = self.scores(x.reshape(-1, x.shape[-1])).float()
        return _top_k_ones(logits, self.top_k, torch.softmax(logits, dim=-1), logits)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}, weights=1"


def expert_activation_sums(x: Tensor, w_up: Tensor, b_up: Tensor | None, partition: Tensor, act: nn.Module) -> Tensor:
    """(N, E) sum over each expert's neurons of the positive part of their activation.

    Args:
        x: (N, D) FFN inputs.
        w_up: (H, D) up-projection; b_up: (H,) or None.
        partition: (E, H/E) neuron indices per expert.
        act: the FFN activation.
    """
    h = act(F.linear(x, w_up, b_up)).clamp_min(0)  # (N, H)
    return h[:, partition].sum(-1)  # (N, E, H/E) -> (N, E)


def router_recall(scores: Tensor, target: Tensor, top_k: int) -> float:
    """Share of the ``top_k`` experts with the largest activation sums that the router's top-k finds."""
    pred = torch.topk(scores, top_k, dim=-1).indices
    true = torch.topk(target, top_k, dim=-1).indices
    hit = (pred.unsqueeze(-1) == true.unsqueeze(-2)).any(-1).float()
    return float(hit.mean())


def train_mlp_router(router: MLPRouter, x: Tensor, target: Tensor, *, epochs: int = 10, batch_size: int = 512,
                     lr: float = 1e-2, seed: int = 0) -> dict[str, float]:
    """Fit ``router`` to predict expert activation sums, MoEfication style; returns held-out recall.

    The tokens are split 80/10/10 (seeded): Adam on binary cross-entropy against
    ``target / max(target)`` on the first part; after every epoch the top-k recall on the second
    part decides which epoch's weights are kept (MoEfication's code also keeps its best epoch;
    the key initialisation competes as epoch 0, so training never makes the router worse on
    it); the last part reports the recall of the kept router.

    Args:
        x: (N, D) FFN inputs on real text.
        target: (N, E) :func:`expert_activation_sums` of those inputs.
        epochs, batch_size, lr: the optimisation.
        seed: shuffling and the split.

    Returns:
        ``{"recall", "recall_keys", "epoch"}``: recall on the reporting part for the kept router
        and for its key initialisation, and the epoch kept (0 = the initialisation).
    """
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    n10 = max(1, len(x) // 10)
    report, select, train = perm[:n10], perm[n10 : 2 * n10], perm[2 * n10 :]
    y = target / target.max().clamp_min(1e-12)

    def recall(idx: Tensor) -> float:
        with torch.no_grad():
            return router_recall(router.scores(x[idx]), target[idx], router.top_k)

    keys_recall = recall(report)
    best, best_state, best_epoch = recall(select), copy.deepcopy(router.state_dict()), 0
    opt = torch.optim.Adam(router.parameters(), lr=lr)
    for epoch in range(1, epochs + 1):
        order = train[torch.randperm(len(train), generator=g)]
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            loss = F.binary_cross_entropy_with_logits(router.scores(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        score = recall(select)
        if score > best:
            best, best_state, best_epoch = score, copy.deepcopy(router.state_dict()), epoch
    router.load_state_dict(best_state)
    return {"recall": recall(report), "recall_keys": keys_recall, "epoch": float(best_epoch)}
