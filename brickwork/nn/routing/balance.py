"""Auxiliary-loss-free load balancing (Wang et al., 2024; DeepSeek-V3, Liu et al., 2024).

A per-expert bias is added to the routing scores *for the choice of experts only*; the
combine weights still come from the unbiased scores, so the bias never enters the model's
function through the weights and gets no gradient. After each training step the bias of an
overloaded expert goes down and that of an underloaded one up by a fixed rate:
``b_i += rate * sign(mean_load - load_i)``. Unlike the auxiliary loss, this adds no gradient
that competes with the language-modelling (or task) gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class SelectionBias(nn.Module):
    """Per-expert selection bias with its sign-based update.

    The load seen during training forwards is accumulated until :meth:`update` is called
    (once per optimizer step, through the router's ``after_step()`` hook of
    :mod:`brickwork.nn.hooks`, so gradient accumulation over micro-batches counts all of them).

    Args:
        num_experts: E.
        rate: update speed ``u`` (DeepSeek-V3 uses 1e-3).
    """

    bias: Tensor
    pending_load: Tensor

    def __init__(self, num_experts: int, rate: float, device: torch.device | str | None = None) -> None:
        super().__init__()
        if rate <= 0:
            raise ValueError(f"SelectionBias: rate must be > 0, got {rate}")
        self.rate = rate
        self.register_buffer("bias", torch.zeros(num_experts, device=device))
        self.register_buffer("pending_load", torch.zeros(num_experts, dtype=torch.float64, device=device))

    def biased(self, scores: Tensor) -> Tensor:
        """(N, E) scores used for selection: ``scores + bias`` (the bias is a buffer, no gradient)."""
        return scores + self.bias.to(scores.dtype)

    @torch.no_grad()
    def observe(self, expert_idx: Tensor) -> None:
        """Accumulate the load of one training forward from its chosen experts (any shape)."""
        self.pending_load += torch.bincount(expert_idx.reshape(-1), minlength=self.bias.numel()).double()

    @torch.no_grad()
    def update(self) -> Tensor:
        """Apply ``bias += rate * sign(mean_load - load)`` and reset the accumulated load.

        Returns:
            (E,) the sign vector applied (zeros when no load was observed).
        """
        load = self.pending_load
        if load.sum() == 0:
            return torch.zeros_like(self.bias)
        direction = torch.sign(load.mean() - load).to(self.bias.dtype)
        self.bias += self.rate * direction
        self.pending_load.zero_()
        return direction

    def extra_repr(self) -> str:
        return f"num_experts={self.bias.numel()}, rate={self.rate}"
