"""Hash routing (Roller et al., 2021, "Hash Layers For Large Sparse Models").

A fixed, parameter-free assignment of tokens to experts. Roller et al. hash the token id;
that needs the ids at a layer that only sees hidden states, so the ids are handed to the
router beforehand (:meth:`HashRouter.set_token_ids`, or :func:`feed_token_ids` once for a
whole model). For inputs without token ids, hash the position in the sequence, or a
deterministic function of the input itself: the sign pattern of a fixed random projection
(locality-sensitive hashing), so equal inputs always meet the same expert.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import pydantic
import torch
from torch import Tensor, nn

from brickwork.nn.routing.types import Routing, token_choice_routing
from brickwork.registry import register

HashKey = Literal["token_id", "position", "input"]

# Knuth's multiplicative hash constant (2^32 / golden ratio); products of it with values
# below 2^31 stay inside int64.
_KNUTH = 2654435761
_LSH_BITS = 16


def _mix(values: Tensor, seed: int) -> Tensor:
    """Integer hash of non-negative int64 ``values`` to [0, 2^32)."""
    v = (values.long() % (1 << 31) + seed) % (1 << 31)
    return (v * _KNUTH) % (1 << 32)


@register("router", "hash")
class HashRouter(nn.Module):
    """Fixed hash routing; no parameters, no auxiliary losses, balanced in expectation.

    Args:
        dim: input width D (used by the ``"input"`` key).
        num_experts: E.
        top_k: experts per token; the k experts are consecutive after the hashed one (mod E),
            weighted 1/k each.
        key: what to hash: ``"token_id"`` (ids given via :meth:`set_token_ids`), ``"position"``
            (index along the sequence dim, -2 of a (..., T, D) input) or ``"input"``
            (sign pattern of a fixed random projection of the input).
        seed: seed of the hash and of the random projection.

    Shapes:
        (..., D) -> :class:`Routing` over N = prod(...) tokens.
    """

    planes: Tensor

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: Annotated[int, pydantic.Field(ge=1)] = 1,
        key: HashKey = "input",
        seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"HashRouter: top_k must be in [1, {num_experts}], got {top_k}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.key = key
        self.seed = seed
        gen = torch.Generator().manual_seed(seed)
        # A buffer, not a parameter: fixed hyperplanes saved with the model so routing survives
        # a reload.
        planes = torch.randn(dim, _LSH_BITS, generator=gen, dtype=torch.float32)
        self.register_buffer("planes", planes.to(device=device, dtype=dtype or torch.float32))
        self.token_ids: Tensor | None = None

    def set_token_ids(self, ids: Tensor | None) -> None:
        """Token ids for the next forward, shaped like the input's leading dims (e.g. (B, T))."""
        self.token_ids = ids

    def _keys(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        if self.key == "token_id":
            if self.token_ids is None:
                raise RuntimeError("HashRouter(key='token_id'): call set_token_ids(ids) or feed_token_ids(model)")
            if tuple(self.token_ids.shape) != tuple(lead):
                raise ValueError(
                    f"HashRouter: token ids {tuple(self.token_ids.shape)} do not match input {tuple(lead)}"
                )
            return self.token_ids.reshape(-1).to(x.device)
        if self.key == "position":
            t = lead[-1] if lead else 1
            return torch.arange(t, device=x.device).expand(*lead).reshape(-1)
        bits = (x.reshape(-1, x.shape[-1]).to(self.planes.dtype) @ self.planes) > 0
        weights = 2 ** torch.arange(_LSH_BITS, device=x.device)
        return (bits.long() * weights).sum(-1)

    @torch.no_grad()
    def assign(self, x: Tensor) -> Tensor:
        """(N, k) experts of each token of ``x`` (..., D)."""
        first = _mix(self._keys(x), self.seed) % self.num_experts
        offsets = torch.arange(self.top_k, device=x.device)
        return (first[:, None] + offsets) % self.num_experts

    def forward(self, x: Tensor) -> Routing:
        top_idx = self.assign(x)
        weights = torch.full(top_idx.shape, 1.0 / self.top_k, device=x.device, dtype=x.dtype)
        return token_choice_routing(top_idx, weights, self.num_experts)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}, key={self.key}"


def feed_token_ids(model: nn.Module) -> Any:
    """Hand the model's input ids to every token-id :class:`HashRouter` inside it, at each call.

    Registers a forward pre-hook on ``model`` that reads its first positional argument (the
    (B, T) token ids) and gives it to the routers.

    Returns:
        The hook handle; ``handle.remove()`` undoes it.
    """
    routers = [m for m in model.modules() if isinstance(m, HashRouter) and m.key == "token_id"]

    def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
        for r in routers:
            r.set_token_ids(args[0])

    return model.register_forward_pre_hook(hook)
