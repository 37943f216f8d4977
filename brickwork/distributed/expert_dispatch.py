"""Token dispatch for expert parallelism: the split arithmetic, the exchanges, their autograd.

An expert-parallel (EP) group of P ranks shares E experts, ``E_l = E / P`` per rank, rank ``p``
owning the contiguous block ``[p E_l, (p + 1) E_l)``. Each rank routes its own tokens and sorts
its assignments by global expert (:func:`brickwork.nn.routing.plan_dispatch`), so its rows are
already grouped by destination rank. Dispatch is two exchanges, as in torchtitan's
``AllToAllTokenDispatcher`` and Megatron-Core's all-to-all dispatcher:

1. the counts: every rank sends its (E,) per-expert row counts, viewed as (P, E_l), with one
   ``all_to_all_single``; rank ``p`` receives ``recv[q, j]``, the rows rank ``q`` has for its
   local expert ``j``;
2. the tokens: one ``all_to_all_single`` with uneven splits (``send_splits[q]`` rows to rank q,
   ``recv.sum(1)[q]`` rows from it).

The received rows are source-rank-major; :func:`expert_major_order` permutes them to
expert-major order so the local experts run on contiguous rows with the existing grouped path.
Combining is the inverse permutation and the same exchange with the splits swapped, and the
backward of each exchange is the exchange with the splits swapped (megablocks' ``AllToAllOp``).

Row order: expert ``j`` receives rank 0's rows, then rank 1's, ..., each in that rank's token
order. When the global batch is the ranks' batches concatenated in rank order, that is exactly
the order a single process gives the expert, so outputs match the single-process MoE bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from brickwork.errors import BrickworkError


def check_expert_split(num_experts: int, ep_size: int, where: str = "expert parallelism") -> int:
    """Experts per rank ``E / P``; a world size that does not divide the experts is one clear error.

    Raises:
        BrickworkError: ``P`` < 1 or ``E`` is not a multiple of ``P``.
    """
    if ep_size < 1 or num_experts % ep_size != 0:
        raise BrickworkError(
            f"{where}: {num_experts} experts cannot be split evenly over an expert-parallel group of "
            f"{ep_size} ranks; use a group size that divides {num_experts} "
            f"({', '.join(str(d) for d in range(1, num_experts + 1) if num_experts % d == 0)})"
        )
    return num_experts // ep_size


def rank_splits(counts: Tensor, ep_size: int) -> Tensor:
    """Rows sent to each rank: ``counts`` (E,) viewed as (P, E_l), summed per rank -> (P,)."""
    return counts.view(ep_size, -1).sum(1)


def expert_major_order(recv_counts: Tensor) -> tuple[Tensor, Tensor]:
    """The permutation from source-rank-major received rows to local-expert-major rows.

    Args:
        recv_counts: (P, E_l) rows received from rank ``q`` for local expert ``j``.

    Returns:
        ``order`` (R,) with ``rows[order]`` expert-major (expert 0's rows from rank 0, then from
        rank 1, ..., then expert 1's), R = ``recv_counts.sum()``; and ``local_counts`` (E_l,)
        rows per local expert.
    """
    p, e_l = recv_counts.shape
    flat = recv_counts.reshape(-1)
    block = torch.repeat_interleave(torch.arange(p * e_l, device=flat.device), flat)  # (q * E_l + j) of each row
    key = (block % e_l) * p + block // e_l  # (j * P + q): expert first, then source rank
    return torch.argsort(key, stable=True), recv_counts.sum(0)


def inverse_permutation(order: Tensor) -> Tensor:
    """``inv`` with ``inv[order] = arange``, so ``y[inv]`` undoes ``x[order]``."""
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device)
    return inv


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits; its backward is the exchange with the splits swapped."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> Tensor:
    """Differentiable uneven all-to-all: ``in_splits[q]`` rows of ``x`` go to rank q, ``out_splits[q]`` come back."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group. Backward sums the gradients too: every rank adds the same global
    quantity to its own loss, so the summed gradient is the group's total and the later
    data-parallel mean (a division by the world size) gives the gradient of that quantity once."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        out = grad.contiguous().clone()
        dist.all_reduce(out, group=ctx.group)
        return out, None


def all_reduce_sum(x: Tensor, group: Any) -> Tensor:
    """Differentiable sum over ``group`` (see :class:`_AllReduceSum` for the gradient convention)."""
    return _AllReduceSum.apply(x, group)


class _AllGather(torch.autograd.Function):
    """Concatenate equal-size blocks along dim 0; backward is the sum-reduce-scatter of the gradient."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        ctx.group = group
        size = dist.get_world_size(group)
        out = x.new_empty((size * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        size = dist.get_world_size(ctx.group)
        out = grad.new_empty((grad.shape[0] // size, *grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad.contiguous(), group=ctx.group)
        return out, None


def all_gather(x: Tensor, group: Any) -> Tensor:
    """Differentiable all-gather along dim 0 (every rank's block, in rank order)."""
    return _AllGather.apply(x, group)


@dataclass
class Exchange:
    """What :func:`dispatch` did, so :func:`combine` can undo it.

    Attributes:
        send_splits: (P,) rows this rank sent to each rank.
        recv_splits: (P,) rows this rank received from each rank.
        order: (R,) source-rank-major -> expert-major permutation of the received rows.
        local_counts: (E_l,) rows per local expert.
        group: the expert-parallel process group.
    """

    send_splits: list[int]
    recv_splits: list[int]
    order: Tensor
    local_counts: Tensor
    group: Any


def exchange_counts(counts: Tensor, group: Any) -> Tensor:
    """Exchange 1: (E,) per-expert counts of this rank -> (P, E_l) counts every rank has for my experts."""
    p = dist.get_world_size(group)
    recv = torch.empty_like(counts)
    dist.all_to_all_single(recv, counts.contiguous(), group=group)  # equal splits of E_l counts
    return recv.view(p, -1)


def dispatch(rows: Tensor, counts: Tensor, group: Any) -> tuple[Tensor, Exchange]:
    """Send rows sorted by global expert to the ranks owning those experts.

    Args:
        rows: (A, D) this rank's assignment rows, sorted by global expert.
        counts: (E,) int64 rows per global expert; sums to A.
        group: the expert-parallel group (P ranks).

    Returns:
        ``local_rows`` (R, D) sorted by local expert and the :class:`Exchange` to combine with.
    """
    p = dist.get_world_size(group)
    recv = exchange_counts(counts, group)
    send_splits = rank_splits(counts, p).tolist()
    recv_splits = recv.sum(1).tolist()
    received = all_to_all(rows, recv_splits, send_splits, group)
    order, local_counts = expert_major_order(recv)
    return received.index_select(0, order), Exchange(send_splits, recv_splits, order, local_counts, group)


def combine(local_out: Tensor, ex: Exchange) -> Tensor:
    """Return expert outputs (R, D') in expert-major order to the ranks their rows came from -> (A, D')."""
    rank_major = local_out.index_select(0, inverse_permutation(ex.order))
    return all_to_all(rank_major, ex.send_splits, ex.recv_splits, ex.group)
