"""Shazeer et al.'s noisy top-k gating, in full (registry name ``noisy_topk``).

"Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts Layer" (Shazeer,
Mirhoseini, Maziarz, Davis, Le, Hinton, Dean; ICLR 2017), sec. 2.1 and appendix A:

* ``H(x)_i = (x W_g)_i + StandardNormal() * Softplus((x W_noise)_i)`` (eq. 4), noise in training
  only; the gate is ``G(x) = Softmax(KeepTopK(H(x), k))`` (eqs. 3, 5): a softmax over the k kept
  noisy logits, the others at zero weight;
* ``L_importance = w_importance * CV(Importance(X))^2`` with ``Importance(X) = sum_x G(x)``
  (eqs. 6-7), and ``L_load = w_load * CV(Load(X))^2`` with the smooth load estimator
  ``Load(X)_i = sum_x P(x, i)`` (eqs. 8-11; :func:`~brickwork.nn.routing.losses.smooth_load`);
  emitted unweighted as ``"importance"`` and ``"load"``, weighted by default at the paper's 0.1
  each (``nn.records.AUX_LOSS_DEFAULTS``);
* ``W_g`` and ``W_noise`` start at all zeros (appendix A: "no signal and some noise"), so the
  experts start equally loaded.

The router brickwork calls ``topk`` is not this one: it is Mixtral-style softmax top-k
(softmax over all experts, top k kept and renormalised, no noise by default; Jiang et al., 2024),
with the Switch loss; ``topk`` keeps meaning that so existing configs and checkpoints are
unchanged.
"""

from __future__ import annotations

from typing import Annotated

import pydantic
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brickwork.nn.routing.losses import cv_squared, smooth_load
from brickwork.nn.routing.types import Routing, router_precision, token_choice_routing
from brickwork.registry import register


@register("router", "noisy_topk")
class NoisyTopKRouter(nn.Module):
    """Shazeer et al.'s (2017) noisy top-k gate with the importance and load losses.

    Args:
        dim: input width D.
        num_experts: E.
        top_k: experts per token k.
        load_balance: emit the ``"importance"`` and ``"load"`` losses during training.
        noise_floor: added to ``Softplus(x W_noise)`` so the load estimator never divides by zero
            (their tensor2tensor code's ``noise_epsilon``, 1e-2).

    Shapes:
        (..., D) -> :class:`Routing` over N = prod(...) tokens with k assignments each.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: Annotated[int, pydantic.Field(ge=1)] = 2,
        load_balance: bool = True,
        noise_floor: Annotated[float, pydantic.Field(ge=0)] = 1e-2,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"NoisyTopKRouter: top_k must be in [1, {num_experts}], got {top_k}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.load_balance = load_balance
        self.noise_floor = noise_floor
        # Appendix A: both weight matrices start at zero.
        self.w_gate = nn.Parameter(torch.zeros(dim, num_experts, device=device, dtype=dtype))
        self.w_noise = nn.Parameter(torch.zeros(dim, num_experts, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Routing:
        x = x.reshape(-1, x.shape[-1])
        clean = router_precision(x @ self.w_gate)  # (N, E); router math in at least fp32
        noisy_train = self.training
        if noisy_train:
            std = F.softplus(router_precision(x @ self.w_noise)) + self.noise_floor
            logits = clean + torch.randn_like(clean) * std
        else:
            logits = clean
        top_val, top_idx = torch.topk(logits, self.top_k, dim=-1)  # (N, k)
        weights = torch.softmax(top_val, dim=-1)  # G(x) on the kept k
        gates = torch.zeros_like(logits).scatter(-1, top_idx, weights)  # (N, E), rows sum to 1

        sums: dict[str, Tensor] = {}  # the (E,) batch sums the losses are CV^2 of
        if self.training and self.load_balance:
            sums["importance"] = gates.sum(0)
            if noisy_train and self.top_k < self.num_experts:
                sums["load"] = smooth_load(clean, logits, std, self.top_k).sum(0)
            else:  # k = E: every expert always runs, the load is the token count (no gradient)
                sums["load"] = (gates > 0).sum(0).float()
        aux = {name: cv_squared(v) for name, v in sums.items()}
        return token_choice_routing(
            top_idx, weights.to(x.dtype), self.num_experts, probs=gates, logits=logits, aux_losses=aux, aux_sums=sums
        )

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}, load_balance={self.load_balance}"
