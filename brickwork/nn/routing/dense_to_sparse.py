"""Dense-to-sparse gating: a softmax over all experts whose temperature is annealed.

DTS-Gate (Nie et al., 2021, "EvoMoE: An Evolutional Mixture-of-Experts Training Framework via
Dense-To-Sparse Gate"): weights ``softmax((logits + g) / tau)`` with Gumbel noise ``g`` during
training; experts whose weight exceeds a small threshold (0.02 in EvoMoE) are run. Early, at a
high temperature, every expert clears the threshold and the layer is dense, so all experts
are trained; as ``tau`` falls the distribution sharpens and fewer experts are run per token,
down to about one. The temperature follows a schedule over training progress, set by the
training loop through :meth:`DenseToSparseRouter.set_progress` (the ``set_progress`` hook
of :mod:`brickwork.nn.hooks`, called model-wide by ``after_optimizer_step(model, progress)``).

Activation dense-to-sparse gate (Nguyen, Akbarian & Ho, 2024, "Is Temperature Sample Efficient
for Softmax Gaussian Mixture of Experts?", ICML): the linear layer's output is passed through
an activation before the tempered softmax, ``softmax(act(W x + b) / tau)``. They show that with
the plain gate the temperature interacts with the gating parameters (through a PDE relation
between their derivatives), so parameter estimation can be as slow as ``O(1/log n)``; an
activation that is independent of its derivatives in their sense (a non-linear one such as
tanh or sigmoid; the identity fails the condition) restores polynomial rates. Choose it with
``activation=`` (registered preset ``activation_dense_to_sparse``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

import pydantic
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brickwork.nn.routing.losses import load_balance_loss, router_z_loss
from brickwork.nn.routing.schedule import Schedule, anneal
from brickwork.nn.routing.types import Routing, router_precision
from brickwork.registry import register

GateActivation = Literal["none", "tanh", "sigmoid", "gelu", "softplus"]

_ACTS: dict[str, Callable[[Tensor], Tensor]] = {
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "gelu": F.gelu,
    "softplus": F.softplus,
}


@register("router", "dense_to_sparse")
class DenseToSparseRouter(nn.Module):
    """Tempered-softmax gate over all experts, annealed from dense to sparse.

    Args:
        dim: input width D.
        num_experts: E.
        tau_start: temperature at progress 0 (EvoMoE: 2.0).
        tau_end: temperature at progress 1 (EvoMoE: 0.3).
        schedule: how the temperature moves between them (:func:`~brickwork.nn.routing.schedule.anneal`).
        threshold: an expert runs for a token when its weight exceeds this (the top expert
            always runs); 0 keeps every expert (fully dense).
        activation: ``"none"`` for DTS-Gate; a non-linearity for the activation
            dense-to-sparse gate of Nguyen et al. (2024).
        gumbel: add Gumbel noise to the logits during training (EvoMoE).
        eval_top_k: if > 0, evaluation uses the top-k experts by weight instead of the
            threshold (EvoMoE evaluates top-1).
        load_balance: emit the ``"load_balance"`` loss (f counted over the chosen assignments).
        z_loss: emit the ``"z_loss"`` on the tempered logits.
        bias: give the linear scorer a bias.

    Shapes:
        (..., D) -> :class:`Routing` with a variable number of assignments per token.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        tau_start: Annotated[float, pydantic.Field(gt=0)] = 2.0,
        tau_end: Annotated[float, pydantic.Field(gt=0)] = 0.3,
        schedule: Schedule = "exponential",
        threshold: Annotated[float, pydantic.Field(ge=0, lt=1)] = 0.02,
        activation: GateActivation = "none",
        gumbel: bool = True,
        eval_top_k: Annotated[int, pydantic.Field(ge=0)] = 0,
        load_balance: bool = True,
        z_loss: bool = False,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if eval_top_k > num_experts:
            raise ValueError(f"DenseToSparseRouter: eval_top_k {eval_top_k} > num_experts {num_experts}")
        self.num_experts = num_experts
        self.tau_start, self.tau_end, self.schedule = tau_start, tau_end, schedule
        self.threshold = threshold
        self.activation = activation
        self.gumbel = gumbel
        self.eval_top_k = eval_top_k
        self.load_balance = load_balance
        self.z_loss = z_loss
        self.proj = nn.Linear(dim, num_experts, bias=bias, device=device, dtype=dtype)
        self.progress = 0.0

    def set_progress(self, fraction: float) -> None:
        """Training-loop hook (``brickwork.nn.hooks``): where training is, 0.0 to 1.0.

        Progress 0 gives ``tau_start``, progress 1 gives ``tau_end``.
        """
        self.progress = min(max(float(fraction), 0.0), 1.0)

    @property
    def temperature(self) -> float:
        """The temperature at the current progress."""
        return anneal(self.tau_start, self.tau_end, self.progress, self.schedule)

    def get_extra_state(self) -> dict[str, Any]:
        return {"progress": self.progress}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.progress = float(state["progress"])

    def forward(self, x: Tensor) -> Routing:
        x = x.reshape(-1, x.shape[-1])
        n = x.shape[0]
        logits = router_precision(self.proj(x))
        if self.activation != "none":
            logits = _ACTS[self.activation](logits)
        tau = self.temperature
        scaled = logits / tau
        probs = torch.softmax(scaled, dim=-1)
        if self.training and self.gumbel:
            # gumbel_softmax(log p, tau) = softmax((logits + g) / tau): the log-normaliser cancels.
            g = -torch.empty_like(logits).exponential_().log()
            weights_all = torch.softmax((logits + g) / tau, dim=-1)
        else:
            weights_all = probs

        if not self.training and self.eval_top_k > 0:
            top_idx = torch.topk(weights_all, self.eval_top_k, dim=-1).indices
            keep = torch.zeros_like(weights_all, dtype=torch.bool).scatter_(-1, top_idx, True)
        else:
            keep = weights_all > self.threshold
            keep.scatter_(-1, weights_all.argmax(-1, keepdim=True), True)  # never leave a token unserved
        token_idx, expert_idx = keep.nonzero(as_tuple=True)  # row-major: token-major order
        weights = weights_all[token_idx, expert_idx]

        aux: dict[str, Tensor] = {}
        if self.training:
            if self.load_balance:
                aux["load_balance"] = load_balance_loss(probs, expert_idx, self.num_experts)
            if self.z_loss:
                aux["z_loss"] = router_z_loss(scaled)
        return Routing(
            token_idx=token_idx,
            expert_idx=expert_idx,
            weights=weights.to(x.dtype),
            num_tokens=n,
            num_experts=self.num_experts,
            probs=probs,
            logits=scaled,
            top_k=None,
            aux_losses=aux,
        )

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, tau={self.tau_start}->{self.tau_end} ({self.schedule}), "
            f"threshold={self.threshold}, activation={self.activation}, progress={self.progress:.3f}"
        )


@register("router", "activation_dense_to_sparse")
def activation_dense_to_sparse(
    dim: int,
    num_experts: int,
    activation: GateActivation = "tanh",
    tau_start: Annotated[float, pydantic.Field(gt=0)] = 2.0,
    tau_end: Annotated[float, pydantic.Field(gt=0)] = 0.3,
    schedule: Schedule = "exponential",
    threshold: Annotated[float, pydantic.Field(ge=0, lt=1)] = 0.02,
    gumbel: bool = False,
    eval_top_k: Annotated[int, pydantic.Field(ge=0)] = 0,
    load_balance: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> DenseToSparseRouter:
    """Activation dense-to-sparse gate ``softmax(act(W x + b) / tau)`` (Nguyen et al., 2024).

    A :class:`DenseToSparseRouter` with a non-linear ``activation`` and, by default, no Gumbel
    noise; the arguments are its own.
    """
    if activation == "none":
        raise ValueError("activation_dense_to_sparse: pick a non-linear activation (the identity is DTS-Gate)")
    return DenseToSparseRouter(
        dim,
        num_experts,
        tau_start=tau_start,
        tau_end=tau_end,
        schedule=schedule,
        threshold=threshold,
        activation=activation,
        gumbel=gumbel,
        eval_top_k=eval_top_k,
        load_balance=load_balance,
        device=device,
        dtype=dtype,
    )
