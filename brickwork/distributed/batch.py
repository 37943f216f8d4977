"""Each rank's slice of a global batch, and the sums that make its step the full-batch step.

Data parallelism here is exact, not approximate: every rank sees the *same* sequence of global
batches (the order is a pure function of (seed, epoch), :func:`brickwork.data.batching.epoch_order`)
and takes a contiguous slice of each (:func:`local_rows`). A rank's loss is the mean over its
``n_r`` rows; scaled by ``share = n_r * W / N`` before backward, the gradient average that DDP and
FSDP2 take (``1/W`` times the sum over ranks) is ``sum_r (n_r / N) grad(mean_r)``, the gradient of
the mean over all ``N`` rows: the step a single process takes on the whole batch, whatever ``W``
and whether or not ``N`` divides by it. So a run resumed with another world size continues the
same trajectory (up to the order of floating-point sums).

A rank whose slice would be empty (a last batch smaller than ``W``) computes on one borrowed row
with ``share = 0``: every rank still runs the same collectives, and the borrowed row adds nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from brickwork.distributed.process_group import DistContext


def local_rows(ctx: DistContext, n: int) -> tuple[int, int]:
    """``(start, size)`` of this rank's contiguous slice of ``n`` rows (sizes differ by at most 1)."""
    per, extra = divmod(n, ctx.world_size)
    return ctx.rank * per + min(ctx.rank, extra), per + (ctx.rank < extra)


def shard_batch(ctx: DistContext, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, float]:
    """This rank's rows of a global batch and its loss share.

    Args:
        ctx: the rank.
        x: (N, ...) inputs of the global batch.
        y: (N, ...) targets.

    Returns:
        ``(x_r, y_r, share)``: (n_r, ...) rows and ``n_r * W / N`` (1.0 for a single process; 0.0
        with one borrowed row when the slice is empty).
    """
    if not ctx.active:
        return x, y, 1.0
    start, size = local_rows(ctx, len(x))
    if size == 0:
        return x[:1], y[:1], 0.0
    return x[start : start + size], y[start : start + size], size * ctx.world_size / len(x)


def all_sum(ctx: DistContext, values: Sequence[float]) -> list[float]:
    """Sum of ``values`` over all ranks, element-wise, in float64 (one all-reduce)."""
    if not ctx.active or not values:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64)
    dist.all_reduce(t, group=ctx.group)
    return t.tolist()


def all_sum_start(ctx: DistContext, values: Sequence[float]) -> Callable[[], list[float]]:
    """Start :func:`all_sum` without waiting; the returned function waits and gives the sums.

    The training step starts the reduction of its scalars before its backward pass, so the
    small message travels while the gradients are computed instead of adding a round trip.
    """
    if not ctx.active or not values:
        done = list(values)
        return lambda: done
    t = torch.tensor(list(values), dtype=torch.float64)
    work = dist.all_reduce(t, group=ctx.group, async_op=True)

    def wait() -> list[float]:
        assert work is not None
        work.wait()
        return t.tolist()

    return wait


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op for one process); bounded by the group's timeout."""
    if ctx.active:
        dist.barrier(group=ctx.group)
