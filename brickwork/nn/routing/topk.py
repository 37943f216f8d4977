"""Token-choice top-k routing: each token picks its k best experts.

The registry's ``topk`` is Mixtral-style softmax top-k (Jiang et al., 2024): a softmax over all
experts, the k largest kept and renormalised, no noise unless asked, with the Switch/GShard
balancing loss and the ST-MoE z-loss. It is *not* Shazeer et al.'s (2017) noisy top-k gate, whose
learned noise, zero initialisation and importance / load losses are
:class:`~brickwork.nn.routing.noisy_topk.NoisyTopKRouter` (``noisy_topk``).
"""

from __future__ import annotations

from typing import Annotated, Literal

import pydantic
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brickwork.nn.routing.balance import SelectionBias
from brickwork.nn.routing.losses import load_balance_loss, router_z_loss
from brickwork.nn.routing.types import Routing, router_precision, token_choice_routing
from brickwork.registry import register

# How scores become combine weights:
# * softmax_topk: softmax over all experts, keep the k largest probabilities as they are
#   (Switch for k=1, GShard, the original Shazeer et al. 2017 softmax over kept logits aside);
# * softmax_topk_renorm: the same, renormalised to sum to 1 over the chosen k (Mixtral);
# * topk_softmax: pick the k largest logits, softmax over those k only (Shazeer et al., 2017;
#   equal in value to softmax_topk_renorm, kept for fidelity with checkpoints that use it);
# * sigmoid_topk: independent sigmoid affinities, keep the k largest (no competition);
# * sigmoid_topk_renorm: sigmoid affinities renormalised over the chosen k (DeepSeek-V3).
Gate = Literal["softmax_topk", "softmax_topk_renorm", "topk_softmax", "sigmoid_topk", "sigmoid_topk_renorm"]

# Exploration noise, training only:
# * jitter: multiply the router's input by U(1 - s, 1 + s) (Switch Transformer, s = 1e-2);
# * gaussian: add N(0, s^2) to the logits;
# * learned: add N(0, 1) * softplus(x W_noise) to the logits, W_noise learned (the noise term of
#   Shazeer et al., 2017, alone: their losses and zero-initialised gate are in noisy_topk).
Noise = Literal["none", "jitter", "gaussian", "learned"]


@register("router", "topk")
class TopKRouter(nn.Module):
    """Token-choice top-k router (Mixtral-style softmax top-k by default): a linear scorer, a gate, top-k.

    Args:
        dim: input width D.
        num_experts: E.
        top_k: experts per token k.
        gate: how scores become weights (see :data:`Gate`).
        noise: exploration noise during training (see :data:`Noise`).
        noise_scale: ``s`` of the jitter or Gaussian noise.
        balance_rate: > 0 enables auxiliary-loss-free balancing: a per-expert selection bias
            updated by ``after_step()`` at this rate (DeepSeek-V3 uses 1e-3).
        load_balance: emit the Switch/GShard ``"load_balance"`` loss during training.
        z_loss: emit the ST-MoE ``"z_loss"`` during training.
        bias: give the scorer a bias.

    Shapes:
        (..., D) -> :class:`Routing` over N = prod(...) tokens with k assignments each.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: Annotated[int, pydantic.Field(ge=1)] = 2,
        gate: Gate = "softmax_topk_renorm",
        noise: Noise = "none",
        noise_scale: Annotated[float, pydantic.Field(ge=0)] = 1e-2,
        balance_rate: Annotated[float, pydantic.Field(ge=0)] = 0.0,
        load_balance: bool = True,
        z_loss: bool = True,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"TopKRouter: top_k must be in [1, {num_experts}], got {top_k}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.gate = gate
        self.noise = noise
        self.noise_scale = noise_scale
        self.load_balance = load_balance
        self.z_loss = z_loss
        self.proj = nn.Linear(dim, num_experts, bias=bias, device=device, dtype=dtype)
        self.noise_proj: nn.Linear | None = None
        if noise == "learned":
            self.noise_proj = nn.Linear(dim, num_experts, bias=False, device=device, dtype=dtype)
            nn.init.zeros_(self.noise_proj.weight)  # as Shazeer et al.'s W_noise (their W_g too: noisy_topk)
        self.selection_bias = SelectionBias(num_experts, balance_rate, device) if balance_rate > 0 else None

    def forward(self, x: Tensor) -> Routing:
        x = x.reshape(-1, x.shape[-1])
        noisy = self.training and self.noise != "none"
        if noisy and self.noise == "jitter":
            x = x * torch.empty_like(x).uniform_(1.0 - self.noise_scale, 1.0 + self.noise_scale)
        logits = router_precision(self.proj(x))  # router math in >= fp32: the softmax is sensitive to round-off
        if noisy and self.noise == "gaussian":
            logits = logits + torch.randn_like(logits) * self.noise_scale
        elif noisy and self.noise_proj is not None:
            logits = logits + torch.randn_like(logits) * F.softplus(router_precision(self.noise_proj(x)))

        if self.gate.startswith("sigmoid"):
            scores = torch.sigmoid(logits)
            probs = scores / scores.sum(-1, keepdim=True)  # normalised affinities, for P_i and entropy
        else:
            probs = torch.softmax(logits, dim=-1)
            scores = logits if self.gate == "topk_softmax" else probs
        select = scores if self.selection_bias is None else self.selection_bias.biased(scores)
        top_idx = torch.topk(select, self.top_k, dim=-1).indices  # (N, k)

        if self.gate == "topk_softmax":
            weights = torch.softmax(logits.gather(-1, top_idx), dim=-1)
        else:
            weights = scores.gather(-1, top_idx)
            if self.gate.endswith("renorm"):
                weights = weights / weights.sum(-1, keepdim=True)

        aux: dict[str, Tensor] = {}
        if self.training:
            if self.load_balance:
                aux["load_balance"] = load_balance_loss(probs, top_idx, self.num_experts)
            if self.z_loss:
                aux["z_loss"] = router_z_loss(logits)
            if self.selection_bias is not None:
                self.selection_bias.observe(top_idx)
        return token_choice_routing(
            top_idx, weights.to(x.dtype), self.num_experts, probs=probs, logits=logits, aux_losses=aux
        )

    def after_step(self) -> None:
        """Training-loop hook (``brickwork.nn.hooks``), once per optimizer step: update the
        auxiliary-loss-free selection bias from the load seen since the last step, if enabled."""
        if self.selection_bias is not None:
            self.selection_bias.update()

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}, gate={self.gate}, noise={self.noise}"


@register("router", "sigmoid")
def sigmoid_topk(
    dim: int,
    num_experts: int,
    top_k: Annotated[int, pydantic.Field(ge=1)] = 2,
    noise: Noise = "none",
    noise_scale: Annotated[float, pydantic.Field(ge=0)] = 1e-2,
    balance_rate: Annotated[float, pydantic.Field(ge=0)] = 0.0,
    load_balance: bool = True,
    z_loss: bool = True,
    bias: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> TopKRouter:
    """Sigmoid affinities, top-k, renormalised over the chosen k (DeepSeek-V3's gate).

    A :class:`TopKRouter` with ``gate="sigmoid_topk_renorm"``; the arguments are its own.
    """
    return TopKRouter(
        dim,
        num_experts,
        top_k,
        gate="sigmoid_topk_renorm",
        noise=noise,
        noise_scale=noise_scale,
        balance_rate=balance_rate,
        load_balance=load_balance,
        z_loss=z_loss,
        bias=bias,
        device=device,
        dtype=dtype,
    )
