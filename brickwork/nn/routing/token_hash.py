"""Token-id hash routing as Roller et al. (2021) do it: a fixed lookup table from vocabulary id to expert.

"Hash Layers For Large Sparse Models" (Roller, Sukhbaatar, Szlam, Weston; NeurIPS 2021), sec. 3:
each token goes to the expert its *id* is assigned to, by a table built before training and never
changed; no router parameters, no balancing loss. Two of their tables are here:

* **random** ("Random Hash"): every id gets an expert at random. We deal the experts out in
  random order, one shuffled round of all E experts per block of E consecutive ids, so the table
  is balanced in ids on every prefix of the vocabulary (each expert owns ``floor(V / E)`` or
  ``ceil(V / E)`` of any first V ids) whatever the vocabulary size turns out to be;
* **frequency** ("Balanced assignment"): built from the training data's token frequencies, the
  ids sorted from most to least frequent and each given, greedily, to the expert with the least
  total frequency so far, so that experts see about equally many *tokens* (not ids).
  :meth:`TokenHashRouter.balance_by_frequency` builds it; the ``hash_balance`` stage calls it
  with the train split's ids on every router built with ``table="frequency"`` (registry name
  ``token_hash_frequency``), which refuses to train before it has its table.

Roller et al. route each token to one expert (k = 1; their MultiHash splits an expert's weights
into segments instead). ``top_k > 1`` is an extension of ours: k distinct experts per id, dealt
so that every expert is still chosen equally often, weighted 1/k each.

The router needs the ids at a layer that only sees hidden states:
:func:`~brickwork.nn.routing.hash.feed_token_ids` hands a model's input ids to every router that
asks for them (``moe_lm`` registers it itself).
"""

from __future__ import annotations

from typing import Annotated, Literal

import pydantic
import torch
from torch import Tensor, nn

from brickwork.nn.routing.types import Routing, token_choice_routing
from brickwork.registry import register


def random_balanced_table(vocab_size: int, num_experts: int, top_k: int, seed: int) -> Tensor:
    """(V, k) int64: a random table in which each block of E consecutive ids uses every expert k times.

    Block b of ids ``[b E, (b + 1) E)`` takes a fresh random permutation ``pi`` of the experts and
    gives id ``b E + j`` the experts ``pi[(j + s) mod E]`` for ``s < k``: k distinct experts per id,
    and each expert exactly k times per full block, so any prefix of the vocabulary is balanced
    to within k ids per expert.
    """
    gen = torch.Generator().manual_seed(seed)
    blocks = -(-vocab_size // num_experts)
    perms = torch.rand(blocks, num_experts, generator=gen).argsort(dim=-1)  # (blocks, E): one permutation each
    j = torch.arange(num_experts)
    slots = (j[:, None] + torch.arange(top_k)[None, :]) % num_experts  # (E, k)
    table = perms[:, slots]  # (blocks, E, k)
    return table.reshape(-1, top_k)[:vocab_size].contiguous()


def frequency_balanced_table(counts: Tensor, num_experts: int, top_k: int) -> Tensor:
    """(V, k) int64: Roller et al.'s balanced assignment of ids to experts by token frequency.

    Ids are taken from most to least frequent (ties: lower id first); each is given to the k
    distinct experts with the least total frequency so far (ties: lower expert first), each of
    which is charged ``count / k``. A greedy longest-processing-time schedule: the largest
    expert load exceeds the mean by at most the largest single id's share.

    Args:
        counts: (V,) occurrences of each id in the training data.
        num_experts: E.
        top_k: experts per id.
    """
    order = sorted(range(len(counts)), key=lambda i: (-float(counts[i]), i))
    load = [0.0] * num_experts
    table = torch.empty(len(counts), top_k, dtype=torch.long)
    for i in order:
        chosen = sorted(range(num_experts), key=lambda e: (load[e], e))[:top_k]
        for e in chosen:
            load[e] += float(counts[i]) / top_k
        table[i] = torch.tensor(chosen)
    return table


@register("router", "token_hash")
class TokenHashRouter(nn.Module):
    """Roller et al.'s hash layer router: a fixed table from token id to expert; no parameters.

    Args:
        dim: input width D (unused: the routing depends on the id only).
        num_experts: E.
        top_k: experts per token (Roller et al.: 1; see the module docstring for k > 1).
        vocab_size: ids the table covers; an id at or above it is refused.
        seed: seed of the random table.
        table: ``"random"`` (Random Hash) or ``"frequency"`` (Balanced assignment; needs
            :meth:`balance_by_frequency`, or :func:`balance_token_hash`, before training).

    Shapes:
        (..., D) with ids (...) given by :meth:`set_token_ids` -> :class:`Routing` over N = prod(...).
    """

    table: Tensor
    frequency_balanced: Tensor
    needs_token_ids = True

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: Annotated[int, pydantic.Field(ge=1)] = 1,
        vocab_size: Annotated[int, pydantic.Field(ge=1)] = 65536,
        seed: int = 0,
        table: Literal["random", "frequency"] = "random",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"TokenHashRouter: top_k must be in [1, {num_experts}], got {top_k}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.vocab_size = vocab_size
        self.table_kind = table
        # Buffers, not parameters: the table is fixed before training and saved with the model,
        # so a reloaded model routes as the trained one did (the frequency table included).
        start = random_balanced_table(vocab_size, num_experts, top_k, seed)
        self.register_buffer("table", start.to(device=device, dtype=torch.int32))
        self.register_buffer("frequency_balanced", torch.zeros((), dtype=torch.bool, device=device))
        self.token_ids: Tensor | None = None

    def set_token_ids(self, ids: Tensor | None) -> None:
        """Token ids for the next forward, shaped like the input's leading dims (e.g. (B, T))."""
        self.token_ids = ids

    @torch.no_grad()
    def balance_by_frequency(self, counts: Tensor) -> None:
        """Replace the table by Roller et al.'s frequency-balanced one for these id counts.

        Args:
            counts: (V',) occurrences of each id in the training data, V' <= ``vocab_size``; ids
                from V' on keep their random assignment.
        """
        if counts.dim() != 1 or len(counts) > self.vocab_size:
            shape = tuple(counts.shape)
            raise ValueError(f"TokenHashRouter: counts must be (V,) with V <= {self.vocab_size}, got {shape}")
        fitted = frequency_balanced_table(counts.detach().cpu(), self.num_experts, self.top_k)
        self.table[: len(counts)] = fitted.to(self.table)
        self.frequency_balanced.fill_(True)

    @torch.no_grad()
    def assign(self, ids: Tensor) -> Tensor:
        """(N, k) experts of the ids (...)."""
        flat = ids.reshape(-1).to(self.table.device).long()
        if flat.numel() and not flat.is_meta and (int(flat.min()) < 0 or int(flat.max()) >= self.vocab_size):
            raise ValueError(f"TokenHashRouter: token ids must be in [0, {self.vocab_size}) (vocab_size)")
        return self.table[flat].long()

    def forward(self, x: Tensor) -> Routing:
        if self.training and self.table_kind == "frequency" and not x.is_meta and not bool(self.frequency_balanced):
            raise RuntimeError(
                "TokenHashRouter(table='frequency'): no frequency table yet; run the hash_balance stage "
                "(or balance_token_hash(model, train_ids)) before training"
            )
        if self.token_ids is None:
            raise RuntimeError("TokenHashRouter: call set_token_ids(ids) or feed_token_ids(model)")
        if tuple(self.token_ids.shape) != tuple(x.shape[:-1]):
            raise ValueError(
                f"TokenHashRouter: token ids {tuple(self.token_ids.shape)} do not match input {tuple(x.shape[:-1])}"
            )
        top_idx = self.assign(self.token_ids).to(x.device)
        weights = torch.full(top_idx.shape, 1.0 / self.top_k, device=x.device, dtype=x.dtype)
        return token_choice_routing(top_idx, weights, self.num_experts)

    def extra_repr(self) -> str:
        kind = "frequency" if bool(self.frequency_balanced) else "random"
        if self.table_kind == "frequency" and kind == "random":
            kind = "frequency (not built yet)"
        return f"num_experts={self.num_experts}, top_k={self.top_k}, vocab_size={self.vocab_size}, table={kind}"


@register("router", "token_hash_frequency")
def token_hash_frequency(
    dim: int,
    num_experts: int,
    top_k: Annotated[int, pydantic.Field(ge=1)] = 1,
    vocab_size: Annotated[int, pydantic.Field(ge=1)] = 65536,
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> TokenHashRouter:
    """Roller et al.'s balanced assignment: ids to experts greedily by training-token frequency.

    A :class:`TokenHashRouter` with ``table="frequency"``; the ``hash_balance`` stage builds its
    table from the train split before training.
    """
    return TokenHashRouter(dim, num_experts, top_k, vocab_size, seed, "frequency", device, dtype)


def balance_token_hash(model: nn.Module, ids: Tensor) -> int:
    """Give every frequency-table :class:`TokenHashRouter` in ``model`` the balanced table of ``ids``.

    Edits ``model`` in place (its routers' table buffers).

    Args:
        ids: training token ids, any shape, values in [0, vocab_size).

    Returns:
        The number of routers rebalanced.
    """
    routers = [m for m in model.modules() if isinstance(m, TokenHashRouter) and m.table_kind == "frequency"]
    if not routers:
        return 0
    flat = ids.reshape(-1).long().cpu()
    for r in routers:
        if flat.numel() and int(flat.max()) >= r.vocab_size:
            raise ValueError(f"balance_token_hash: ids reach {int(flat.max())}, the table covers {r.vocab_size}")
        r.balance_by_frequency(torch.bincount(flat, minlength=1))
    return len(routers)
