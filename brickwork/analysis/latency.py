"""Wall-clock latency, measured the way the benchmark rules ask (warm-up, median of repeats)."""

from __future__ import annotations

import statistics
import time

import torch
from torch import Tensor, nn


@torch.no_grad()
def measure_latency(model: nn.Module, x: Tensor, *, repeats: int = 5, warmup: int = 1) -> float:
    """Median seconds per sample of ``model(x)`` in eval mode, for the batch ``x`` of shape (B, ...)."""
    was_training = model.training
    model.eval()
    try:
        for _ in range(warmup):
            model(x)
        times = []
        for _ in range(repeats):
            if x.is_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(x)
            if x.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    finally:
        model.train(was_training)
    return statistics.median(times) / x.shape[0]
