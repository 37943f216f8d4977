"""One point of an accuracy-compute trade-off: a model (or sub-model) measured on a split.

Every model a depth stage measures (a chain of layers, a pruned model, a sub-network, a stitched
model) becomes a point ``{label, accuracy, flops, latency_us, params, ...}``; the stages plot
their points against FLOPs and latency and add the key ones to the run's overall plot.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from brickwork.analysis.compute import accuracy_and_flops, count_params
from brickwork.analysis.timing import measure_latency
from brickwork.data.base import Split
from brickwork.data.batching import batches


def measure_point(
    model: nn.Module,
    split: Split,
    label: str,
    *,
    batch_size: int = 256,
    device: str = "cpu",
    latency_repeats: int = 5,
    **extra: Any,
) -> dict[str, Any]:
    """Accuracy, FLOPs per sample, latency per sample (batch of ``batch_size``) and parameters.

    Args:
        model: (B, ...) -> (B, K) or (B, T, K); evaluated in eval mode, its mode restored.
        split: the evaluation split, every sample measured.
        label: the point's name in tables and plots.
        batch_size: evaluation batch, and the batch latency is measured at.
        device: where the batches go.
        latency_repeats: median of this many timed runs.
        **extra: further keys of the point, kept as given.
    """
    acc, flops = accuracy_and_flops(model, batches(split.x, split.y, batch_size, device=device))
    latency = measure_latency(model, split.x[:batch_size].to(device), repeats=latency_repeats)
    return {
        "label": label,
        "accuracy": acc,
        "flops": flops,
        "latency_us": latency * 1e6,
        "params": count_params(model),
        **extra,
    }
