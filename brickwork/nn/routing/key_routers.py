"""Routers that read the experts' own keys: which neuron groups of an FFN to compute per token.

Both choose the top-k experts per token and combine them with weight 1: an FFN's output is the
plain sum of its neurons' contributions, so a chosen expert contributes exactly what its
neurons contribute in the dense FFN, and top-k = E reproduces the dense FFN (MoEfication,
:func:`brickwork.ops.moefy.moefy`, builds them from a dense FFN's neuron groups).

* :class:`KeyRouter` (router ``emoe``): EMoE's training-free avg-k gate (Qiu et al., 2024,
  "Unlocking Emergent Modularity in Large Language Models"): ``score_e = x . mean_{i in e} W_up[i]``,
  softmax, top-k, with EMoE's "one score" combination (weights 1). The mean key is recomputed
  from the expert bank's current weights at every forward, so the gate follows the keys when
  the model is fine-tuned and adds no parameter.
* :class:`MLPRouter` (router ``mlp``): MoEfication's learned router (Zhang et al., 2022):
  ``W2 tanh(W1 x/|x|)`` with ``W1`` initialised to the experts' mean normalised key and ``W2``
  to the identity. It is trained apart from the task loss (the combine weights are constant 1,
  so no task gradient reaches it) to predict each expert's sum of positive activations: that
  training belongs to the conversion (:func:`brickwork.ops.moefy_router.train_mlp_router`).

Neither emits an auxiliary loss.
"""

from __future__ import annotations

from typing import Annotated, Protocol

import pydantic
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brickwork.nn.routing.types import Routing, router_precision, token_choice_routing
from brickwork.registry import register


class KeyBank(Protocol):
    """An expert bank that exposes its experts' input weights as ``w_in`` (E, D, H/E).

    A gated bank (``glu = True``, ``w_in`` (E, D, 2H/E) as ``[activated | gate]`` columns) is read
    through its activated half.
    """

    w_in: Tensor


def bank_keys(bank: KeyBank) -> Tensor:
    """(E, D, H/E) the keys (input weight columns) of every expert's neurons, current weights."""
    w = bank.w_in
    return w[..., : w.shape[2] // 2] if getattr(bank, "glu", False) else w


def _top_k_ones(scores: Tensor, top_k: int, probs: Tensor | None, logits: Tensor | None) -> Routing:
    top_idx = torch.topk(scores, top_k, dim=-1).indices  # (N, k)
    weights = torch.ones(top_idx.shape, dtype=scores.dtype, device=scores.device)
    return token_choice_routing(top_idx, weights, scores.shape[-1], probs=probs, logits=logits)


def _check(name: str, dim: int, num_experts: int, top_k: int, bank: KeyBank | None) -> None:
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"{name}: top_k must be in [1, {num_experts}], got {top_k}")
    if bank is not None and tuple(bank.w_in.shape[:2]) != (num_experts, dim):
        raise ValueError(f"{name}: the bank's w_in {tuple(bank.w_in.shape)} is not ({num_experts}, {dim}, ...)")


@register("router", "emoe")
class KeyRouter(nn.Module):
    """EMoE avg-k gate: top-k experts by ``x . mean key``, combined with weight 1.

    Args:
        dim: input width D.
        num_experts: E.
        top_k: experts per token.
        bank: the expert bank whose ``w_in`` (E, D, H/E) holds each expert's keys (columns); the
            router reads it at every forward and does not own it (the MoE does).

    Shapes:
        (..., D) -> :class:`Routing` with ``top_k`` assignments per token.
    """

    def __init__(
        self, dim: int, num_experts: int, top_k: Annotated[int, pydantic.Field(ge=1)] = 2, *, bank: KeyBank
    ) -> None:
        super().__init__()
        _check("KeyRouter", dim, num_experts, top_k, bank)
        self._bank = [bank]  # a list hides the bank from module traversal: the MoE owns it
        self.num_experts = num_experts
        self.top_k = top_k

    def keys(self) -> Tensor:
        """(E, D) mean key of every expert, from the bank's current weights."""
        return bank_keys(self._bank[0]).mean(dim=2)

    def forward(self, x: Tensor) -> Routing:
        x = x.reshape(-1, x.shape[-1])
        logits = router_precision(x @ self.keys().t())  # (N, E): one small matmul, counted as router FLOPs
        probs = torch.softmax(logits, dim=-1)
        return _top_k_ones(logits, self.top_k, probs, logits)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}, gate=avg-k keys, weights=1"


@register("router", "mlp")
class MLPRouter(nn.Module):
    """MoEfication's MLP router: ``W2 tanh(W1 x / |x|)``, top-k experts combined with weight 1.

    Args:
        dim: input width D.
        num_experts: E.
        top_k: experts per token.
        bank: if given, ``W1`` starts at the experts' mean normalised keys and ``W2`` at the
            identity (MoEfication's initialisation); otherwise both keep PyTorch's default init.

    Shapes:
        (..., D) -> :class:`Routing` with ``top_k`` assignments per token.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: Annotated[int, pydantic.Field(ge=1)] = 2,
        *,
        bank: KeyBank | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check("MLPRouter", dim, num_experts, top_k, bank)
        self.num_experts = num_experts
        self.top_k = top_k
        self.w1 = nn.Linear(dim, num_experts, bias=False, device=device, dtype=dtype)
        self.w2 = nn.Linear(num_experts, num_experts, bias=False, device=device, dtype=dtype)
        if bank is not None:
            keys = bank_keys(bank).detach().transpose(1, 2)  # (E, H/E, D)
            self.init_from_keys(F.normalize(keys, dim=-1).mean(1))  # mean normalised key (E, D)

    def init_from_keys(self, keys: Tensor) -> None:
        """``W1`` = the experts' mean normalised keys (E, D), ``W2`` = identity (MoEfication's init)."""
        with torch.no_grad():
            self.w1.weight.copy_(keys)
            self.w2.weight.copy_(torch.eye(self.num_experts))

    def scores(self, x: Tensor) -> Tensor:
        """(N, E) predicted expert scores (logits of the expert's scaled activation sum)."""
        return self.w2(torch.tanh(self.w1(F.normalize(x, dim=-1))))

    def forward(self, x: Tensor) -> Routing:
        logits = router_precision(self.scores(x.reshape(-1, x.shape[-1])))
        return _top_k_ones(logits, self.top_k, torch.softmax(logits, dim=-1), logits)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}, weights=1"
