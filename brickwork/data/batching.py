"""Cutting tensors into batches: the one place brickwork does it.

Two helpers, one for each kind of pass:

- :func:`batches` yields ``(x, y)`` pairs for training and evaluation, in an order that depends
  only on (seed, epoch) (:func:`epoch_order`). Keeping the order a pure function of the seed and
  the epoch is what lets a resumed run see exactly the batches an uninterrupted one would have
  seen, with no sampler state to save.
- :func:`input_batches` yields model inputs alone, in order, for measurement passes (FLOPs,
  activations, latency); token ids are grouped by length so that no padding is seen
  (:func:`brickwork.data.sentences.token_batches`).
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
    x: Tensor,
    y: Tensor,
    batch_size: int,
    *,
    order: Tensor | None = None,
    drop_last: bool = False,
    limit: int | None = None,
    device: str | torch.device | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(x[idx], y[idx])`` mini-batches, in ``order`` if given, else sequentially.

    Args:
        x: (N, ...) inputs.
        y: (N, ...) targets.
        batch_size: rows per batch (the last one may be smaller unless ``drop_last``).
        order: optional (N,) permutation to draw rows in.
        drop_last: skip a final incomplete batch.
        limit: use only the first ``limit`` rows (of ``order`` if given).
        device: move each batch there (``None``: leave it where it is).
    """
    n = len(x) if limit is None else min(limit, len(x))
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        if order is None:
            xb, yb = x[start : min(start + batch_size, stop)], y[start : min(start + batch_size, stop)]
        else:
            idx = order[start : min(start + batch_size, stop)]
            xb, yb = x[idx], y[idx]
        yield (xb, yb) if device is None else (xb.to(device), yb.to(device))


def input_batches(
    x: Tensor,
    batch_size: int,
    *,
    padded: bool = False,
    limit: int | None = None,
    device: str | torch.device | None = None,
) -> Iterator[Tensor]:
    """Yield model inputs ``x[s : s + batch_size]`` in order, for measurement passes.

    With ``padded``, ``x`` holds sentences of token ids padded with 0 at the end; they are
    grouped by length instead, so that statistics over tokens never count padded positions
    (every row is still seen once). Not for character LMs, where 0 is a real token.

    Args:
        x: (N, ...) float inputs, or (N, T) int64 token ids.
        batch_size: rows per batch.
        padded: ``x`` is 0-padded token ids of a sentence encoder.
        limit: use only the first ``limit`` rows.
        device: move each batch there (``None``: leave it where it is).
    """
    from brickwork.data.sentences import token_batches  # sentences imports registry; keep this light

    n = len(x) if limit is None else min(limit, len(x))
    if padded:
        it: Iterator[Tensor] = (b for b, _ in token_batches(x[:n], batch_size))
    else:
        it = (x[s : min(s + batch_size, n)] for s in range(0, n, batch_size))
    for b in it:
        yield b if device is None else b.to(device)


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    """How many batches :func:`batches` yields for ``n`` rows."""
    return n // batch_size if drop_last else -(-n // batch_size)
