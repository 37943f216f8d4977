"""Expert-choice routing (Zhou et al., 2022): each expert picks its top-C tokens."""

from __future__ import annotations

import math
from typing import Annotated

import pydantic
import torch
from torch import Tensor, nn

from brickwork.nn.routing.losses import router_z_loss
from brickwork.nn.routing.types import Routing, router_precision
from brickwork.registry import register


@register("router", "expert_choice")
class ExpertChoiceRouter(nn.Module):
    """Experts choose tokens: ``S = softmax(x W)`` over experts, then top-C tokens per expert.

    With ``C = ceil(N * c / E)`` every expert processes exactly C tokens, so the load is
    balanced by construction and no balancing loss is needed; a token may be chosen by
    several experts or by none (it then passes through the residual). ``c`` (the capacity
    factor) is the average number of experts per token. The weight of an assignment is the
    token's softmax score for that expert, which gives the router its gradient.

    Note: the choice looks at all N tokens of the batch together, so in an autoregressive
    model a token's routing depends on later tokens (a known limitation of expert choice).

    Args:
        dim: input width D.
        num_experts: E.
        capacity_factor: ``c``, average experts per token (Zhou et al. use 2).
        z_loss: emit the ST-MoE ``"z_loss"`` during training.
        bias: give the scorer a bias.

    Shapes:
        (..., D) -> :class:`Routing` with E * C assignments, C per expert.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        capacity_factor: Annotated[float, pydantic.Field(gt=0)] = 2.0,
        z_loss: bool = True,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor
        self.z_loss = z_loss
        self.proj = nn.Linear(dim, num_experts, bias=bias, device=device, dtype=dtype)

    def capacity(self, num_tokens: int) -> int:
        """Tokens per expert C for a batch of ``num_tokens``: ``ceil(N * c / E)``, at most N."""
        return max(1, min(num_tokens, math.ceil(num_tokens * self.capacity_factor / self.num_experts)))

    def forward(self, x: Tensor) -> Routing:
        x = x.reshape(-1, x.shape[-1])
        n = x.shape[0]
        logits = router_precision(self.proj(x))
        probs = torch.softmax(logits, dim=-1)  # (N, E): softmax over experts, as in the paper
        c = self.capacity(n)
        weights, token_idx = torch.topk(probs.t(), c, dim=-1)  # (E, C): each expert's best tokens
        expert_idx = torch.arange(self.num_experts, device=x.device).repeat_interleave(c)
        aux: dict[str, Tensor] = {}
        if self.training and self.z_loss:
            aux["z_loss"] = router_z_loss(logits)
        return Routing(
            token_idx=token_idx.reshape(-1),
            expert_idx=expert_idx,
            weights=weights.reshape(-1).to(x.dtype),
            num_tokens=n,
            num_experts=self.num_experts,
            probs=probs,
            logits=logits,
            top_k=None,
            aux_losses=aux,
        )

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, capacity_factor={self.capacity_factor}"
