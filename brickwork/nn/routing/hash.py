"""Fixed, parameter-free routing by a hash of the token id, its position, or the input (LSH).

Roller et al. (2021), "Hash Layers For Large Sparse Models", route by a *table* from token id to
expert built before training: that is :class:`~brickwork.nn.routing.token_hash.TokenHashRouter`
(registry name ``token_hash``). This module's :class:`HashRouter` hashes a key with an integer
mixing function instead: the token id (ids handed over by :func:`feed_token_ids`), the position
in the sequence, or, for inputs without ids, the sign pattern of a fixed random projection of the
input (locality-sensitive hashing, registry name ``lsh``; ``hash`` is kept as an alias of it for
existing configs), so that equal inputs always meet the same expert.

The mixing function is the murmur3 32-bit finaliser, whose every output bit depends on every
input bit. The multiplicative hash used before (``key * 2654435761 mod 2^32``, then ``mod E``)
kept only the key's low ``log2 E`` bits for a power-of-two E: token-id and position keys became
``(key + seed) mod E`` (round robin) and the LSH used 3 of its 16 hyperplanes at 8 experts.
Models saved with the old hash route differently now (issue 14; none was shipped).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import pydantic
import torch
from torch import Tensor, nn

from brickwork.nn.routing.types import Routing, token_choice_routing
from brickwork.registry import register

HashKey = Literal["token_id", "position", "input"]

_LSH_BITS = 16
_MASK32 = 0xFFFFFFFF


def _mix(values: Tensor, seed: int) -> Tensor:
    """Integer hash of non-negative int64 ``values`` to [0, 2^32): murmur3's fmix32 of ``value ^ seed``.

    int64 products wrap modulo 2^64, which leaves their low 32 bits exact, and those are all
    that is kept.
    """
    h = (values.long() ^ (seed & _MASK32)) & _MASK32
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _MASK32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


@register("router", "lsh", "Fixed routing by a hash of an LSH code of the input (or position / token id).")
@register("router", "hash", "Alias of `lsh` (kept for existing configs); Roller et al.'s id table is `token_hash`.")
class HashRouter(nn.Module):
    """Fixed hash routing; no parameters, no auxiliary losses, balanced in expectation.

    Not Roller et al.'s table (:class:`~brickwork.nn.routing.token_hash.TokenHashRouter`): the
    ``"token_id"`` key hashes the id with a mixing function, balanced in expectation only.

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

    @property
    def needs_token_ids(self) -> bool:
        """Whether :func:`feed_token_ids` must hand this router the model's input ids."""
        return self.key == "token_id"

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
    """Hand the model's input ids to every router inside it that asks for them, at each call.

    Registers a forward pre-hook on ``model`` that reads its first positional argument (the
    (B, T) token ids) and gives it to each submodule whose ``needs_token_ids`` is true (a
    token-id :class:`HashRouter`, a :class:`~brickwork.nn.routing.token_hash.TokenHashRouter`).
    The routers are looked up from the module the hook is called on, so a deep copy of the model
    feeds its own routers.

    Returns:
        The hook handle; ``handle.remove()`` undoes it.
    """
    return model.register_forward_pre_hook(_feed_ids)


def _feed_ids(module: nn.Module, args: tuple[Any, ...]) -> None:
    for m in module.modules():
        if getattr(m, "needs_token_ids", False):
            m.set_token_ids(args[0])  # type: ignore[operator]


def wants_token_ids(model: nn.Module) -> bool:
    """Whether any router in ``model`` needs the input ids (:func:`feed_token_ids`)."""
    return any(getattr(m, "needs_token_ids", False) for m in model.modules())
