"""One compute accounting for every report: parameters, and FLOPs actually executed.

FLOPs are counted at the dispatcher with :class:`torch.utils.flop_counter.FlopCounterMode`,
i.e. from the matrix multiplications, convolutions and attention kernels that really ran.
This is what makes the count honest for dynamic bricks without any bookkeeping in them:
an unchosen expert runs no matmul, an exited sample was removed from the batch, a skipped
layer was never called, so none of them is counted. A masked dense matmul *is* counted in
full, because it is executed in full.

Convention (as in Kaplan et al., 2020, and fvcore): one multiply-accumulate = 2 FLOPs;
matmuls, convolutions and attention score/value products are counted; elementwise ops,
norms, softmax and biases are not (they are a few percent of the total in these models).

A brick that runs an operator the counter does not know (a custom kernel) registers a
formula with :func:`register_flops` so the same accounting covers it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

_CUSTOM_FORMULAS: dict[Any, Callable[..., int]] = {}


def register_flops(op: Any) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Register a FLOP formula for an operator the dispatcher counter does not know.

    The formula receives the operator's arguments (tensors' shapes where the op takes
    tensors, via ``torch.utils.flop_counter``'s convention) and returns FLOPs.
    """

    def wrap(fn: Callable[..., int]) -> Callable[..., int]:
        _CUSTOM_FORMULAS[op] = fn
        return fn

    return wrap


@dataclass
class Compute:
    """What a model cost on some inputs.

    Attributes:
        params: total parameters.
        flops_per_sample: mean FLOPs executed per input sample (forward only).
        samples: how many samples the mean is over.
        by_module: mean FLOPs per sample attributed to each top-level child module path.
    """

    params: int
    flops_per_sample: float
    samples: int
    by_module: dict[str, float] = field(default_factory=dict)


def count_params(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (shared parameters counted once)."""
    seen: set[int] = set()
    n = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        n += p.numel()
    return n


class FlopMeter:
    """Context manager that counts FLOPs executed inside it, attributable to modules.

    Example:
        >>> meter = FlopMeter()
        >>> with meter:
        ...     model(x)
        >>> meter.total, meter.per_module()["body.layers.0"]
    """

    def __init__(self, depth: int = 3) -> None:
        self._mode = FlopCounterMode(display=False, depth=depth, custom_mapping=dict(_CUSTOM_FORMULAS))

    def __enter__(self) -> FlopMeter:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)

    @property
    def total(self) -> int:
        return int(self._mode.get_total_flops())

    def per_module(self) -> dict[str, int]:
        """FLOPs per module path (as ``FlopCounterMode`` names them, root name stripped)."""
        out: dict[str, int] = {}
        for name, ops in self._mode.get_flop_counts().items():
            if name == "Global":
                continue
            _, _, path = name.partition(".")
            out[path] = int(sum(ops.values()))
        return out


@torch.no_grad()
def measure_compute(
    model: nn.Module, batches: Iterable[Tensor], *, max_samples: int | None = None
) -> Compute:
    """Mean forward FLOPs per sample executed by ``model`` on ``batches``, in eval mode.

    Args:
        model: any module; its mode is restored afterwards.
        batches: input tensors with the batch on dim 0.
        max_samples: stop after this many samples (FLOPs of static models do not depend
            on the data; dynamic ones do, so measure them on the evaluation set).
    """
    was_training = model.training
    model.eval()
    total, samples = 0, 0
    by_module: dict[str, float] = defaultdict(float)
    try:
        for x in batches:
            meter = FlopMeter(depth=2)
            with meter:
                model(x)
            total += meter.total
            samples += x.shape[0]
            for k, v in meter.per_module().items():
                by_module[k] += v
            if max_samples is not None and samples >= max_samples:
                break
    finally:
        model.train(was_training)
    if samples == 0:
        raise ValueError("measure_compute: no samples given")
    return Compute(
        params=count_params(model),
        flops_per_sample=total / samples,
        samples=samples,
        by_module={k: v / samples for k, v in by_module.items()},
    )


def _grouped_mm_flops(a_shape: Any, b_shape: Any, *args: Any, **kwargs: Any) -> int:
    """FLOPs of ``torch._grouped_mm``: 2 * rows(a) * K * N for 2D a (tokens x K) and 3D b (G, K, N)."""
    if len(a_shape) == 2 and len(b_shape) == 3:
        return 2 * a_shape[0] * a_shape[1] * b_shape[2]
    if len(a_shape) == 3 and len(b_shape) == 3:
        return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]
    if len(a_shape) == 2 and len(b_shape) == 2:  # (K, M_total)^T-style weight-gradient form
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    return 0


# torch 2.13's FlopCounterMode has no entry for grouped matmul; the MoE fast path uses it.
if hasattr(torch.ops.aten, "_grouped_mm"):
    register_flops(torch.ops.aten._grouped_mm)(_grouped_mm_flops)


def _cpu_sdpa_flops(q: Any, k: Any, v: Any, *args: Any, **kwargs: Any) -> int:
    """The CPU flash-attention kernel: QK^T and PV products, (B, H, T, E) shapes."""
    return sdpa_flop_count(q, k, v)


# On the CPU, scaled_dot_product_attention dispatches to a kernel the counter misses.
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    register_flops(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)(_cpu_sdpa_flops)
