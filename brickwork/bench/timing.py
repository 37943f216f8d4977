"""Side-by-side timing: interleaved candidates, warm-up, median of repeats.

Interleaving (A, B, A, B, ...) instead of (A, A, ..., B, B, ...) keeps a slow drift of the
machine (another process, thermal state) from landing on one candidate only.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

import torch


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def interleaved(
    candidates: Mapping[str, Callable[[], object]], *, repeats: int = 5, warmup: int = 1
) -> dict[str, float]:
    """Median seconds per call of each candidate, timed in rotating order.

    Args:
        candidates: name -> zero-argument callable doing one unit of work.
        repeats: timed rounds; each round calls every candidate once.
        warmup: untimed rounds first (allocator, caches, lazy init).
    """
    names = list(candidates)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        # Rotate the starting candidate so none always runs first (after the other's garbage).
        for n in names[r % len(names) :] + names[: r % len(names)]:
            _sync()
            t0 = time.perf_counter()
            candidates[n]()
            _sync()
            if r >= warmup:
                times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}
