"""Batches from tensor splits, in an order that depends only on (seed, epoch).

Keeping the order a pure function of the seed and the epoch is what lets a resumed run see
exactly the batches an uninterrupted one would have seen, with no sampler state to save.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """A permutation of ``range(n)`` for ``epoch``; the same for the same (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def batches(
    x: Tensor, y: Tensor, batch_size: int, *, order: Tensor | None = None, drop_last: bool = False
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(x[idx], y[idx])`` mini-batches, in ``order`` if given, else sequentially."""
    n = len(x)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        if order is None:
            yield x[start : start + batch_size], y[start : start + batch_size]
        else:
            idx = order[start : start + batch_size]
            yield x[idx], y[idx]


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)
