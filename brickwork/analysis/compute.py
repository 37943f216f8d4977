"""One compute accounting for every report, stage, verb and benchmark: parameters, and FLOPs
actually executed, for a whole model, per module path, per body layer and exit, and per nested
sub-network.

FLOPs are counted at the dispatcher with :class:`torch.utils.flop_counter.FlopCounterMode`,
i.e. from the matrix multiplications, convolutions and attention kernels that really ran.
This is what makes the count honest for dynamic bricks without any bookkeeping in them:
an unchosen expert runs no matmul, an exited sample was removed from the batch, a skipped
layer was never called, so none of them is counted. A masked dense matmul *is* counted in
full, because it is executed in full. This module is the only one that touches the counter,
so every figure includes the registered custom formulas (a raw ``FlopCounterMode`` misses the
CPU attention kernel and grouped matmul, i.e. all attention and MoE-expert FLOPs on the CPU).

Convention (as in Kaplan et al., 2020, and fvcore): one multiply-accumulate = 2 FLOPs;
matmuls, convolutions and attention score/value products are counted; elementwise ops,
norms, softmax and biases are not (they are a few percent of the total in these models).

A brick that runs an operator the counter does not know (a custom kernel) registers a
formula with :func:`register_flops` so the same accounting covers it.

The family:

* :func:`count_params`: parameters.
* :func:`measure_compute`: whole model and per module path over batches of inputs
  (:meth:`Compute.flops_in` sums the modules whose path matches a pattern).
* :func:`accuracy_and_flops`: accuracy and FLOPs per sample in one evaluation pass.
* :func:`stack_flops`: each piece of a stack model (stem, body layers, exits, gates, head).
* :func:`subnet_flops`: each sub-network of a nested supernet.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from brickwork.nn.exits import EarlyExit
from brickwork.nn.modes import evaluating
from brickwork.nn.nested import NestedModel
from brickwork.nn.stack import StackModel

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
        # ``depth`` only limits the counter's printed table; counts are kept for every module.
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


@contextmanager
def _evaluating(*modules: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd inside; every module's own mode restored afterwards."""
    with evaluating(*modules), torch.no_grad():
        yield


def _metered(fn: Callable[..., Any], *args: Any) -> tuple[Any, FlopMeter]:
    """``fn(*args)`` and the meter that counted it."""
    meter = FlopMeter()
    with meter:
        out = fn(*args)
    return out, meter


# -- whole model and module paths ----------------------------------------------------------------


@dataclass
class Compute:
    """What a model cost on some inputs.

    Attributes:
        params: total parameters.
        samples: how many samples the figures are over.
        total_flops: FLOPs executed on all of them (forward only).
        module_totals: FLOPs executed on all of them in each module, by path (``body.layers.0``;
            a module's figure includes its sub-modules').
    """

    params: int
    samples: int
    total_flops: int
    module_totals: dict[str, int] = field(default_factory=dict)

    @property
    def flops_per_sample(self) -> float:
        """Mean FLOPs executed per input sample."""
        return self.total_flops / self.samples

    @property
    def by_module(self) -> dict[str, float]:
        """Mean FLOPs per sample executed in each module, by path."""
        return {k: v / self.samples for k, v in self.module_totals.items()}

    def flops_in(self, pattern: str) -> float:
        """Mean FLOPs per sample in the modules whose path fully matches ``pattern`` (a regex).

        Only top-most matches are summed: a match inside another match is already in its figure.
        """
        rx = re.compile(pattern)
        hits = sorted(k for k in self.module_totals if rx.fullmatch(k))
        top = [k for k in hits if not any(k.startswith(f"{h}.") for h in hits)]
        return sum(self.module_totals[k] for k in top) / self.samples


def measure_compute(model: nn.Module, batches: Iterable[Tensor], *, max_samples: int | None = None) -> Compute:
    """Parameters and FLOPs executed by ``model`` on ``batches`` in eval mode, in total and per module.

    Args:
        model: any module; its mode is restored afterwards.
        batches: input tensors with the batch on dim 0, (B, ...).
        max_samples: stop after the batch that reaches this many samples (FLOPs of static models
            do not depend on the data; dynamic ones do, so measure them on the evaluation set).

    Raises:
        ValueError: ``batches`` is empty.
    """
    total = samples = 0
    per_module: dict[str, int] = defaultdict(int)
    with _evaluating(model):
        for x in batches:
            _, meter = _metered(model, x)
            total += meter.total
            samples += x.shape[0]
            for k, v in meter.per_module().items():
                per_module[k] += v
            if max_samples is not None and samples >= max_samples:
                break
    if samples == 0:
        raise ValueError("measure_compute: no samples given")
    return Compute(count_params(model), samples, total, dict(per_module))


def accuracy_and_flops(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]) -> tuple[float, float]:
    """Accuracy and mean FLOPs executed per sample, in one eval-mode pass.

    Args:
        model: (B, ...) -> (B, K) or (B, T, K) logits; its mode is restored afterwards.
        batches: ``(x, y)`` pairs, y of shape (B,) or (B, T).

    Returns:
        ``(accuracy, flops per sample)``; accuracy is per target element, so per token for sequences.
    """
    correct = count = flops = samples = 0
    with _evaluating(model):
        for x, y in batches:
            out, meter = _metered(model, x)
            flops += meter.total
            samples += len(x)
            correct += int((out.argmax(-1) == y).sum())
            count += y.numel()
    return correct / max(count, 1), flops / max(samples, 1)


# -- pieces of a stack model -----------------------------------------------------------------------


@dataclass
class StackFlops:
    """FLOPs per sample of each piece of a stack model, each piece run on what reaches it.

    Attributes:
        stem: the stem.
        layers: each body layer, in order.
        exits: each exit head, by the body layer it reads.
        gates: each exit gate (reading its exit's output), by layer.
        head: the final head.
    """

    stem: float
    layers: list[float]
    exits: dict[int, float] = field(default_factory=dict)
    gates: dict[int, float] = field(default_factory=dict)
    head: float = 0.0

    @property
    def full(self) -> float:
        """The plain model's cost: stem, every layer, final head (no exit scored)."""
        return self.stem + sum(self.layers) + self.head

    def truncated(self, layer: int) -> float:
        """The cost of the model cut after body ``layer`` and answering from its exit there (the
        final head after the last layer), scoring no other exit."""
        body = self.stem + sum(self.layers[: layer + 1])
        return body + (self.head if layer == len(self.layers) - 1 else self.exits[layer])

    def as_dict(self) -> dict[str, float]:
        """``stem``, ``layer<i>``, ``exit<i>``, ``gate<i>``, ``head``, in the order they run."""
        out = {"stem": self.stem}
        for i, cost in enumerate(self.layers):
            out[f"layer{i}"] = cost
            if i in self.exits:
                out[f"exit{i}"] = self.exits[i]
                if i in self.gates:
                    out[f"gate{i}"] = self.gates[i]
        out["head"] = self.head
        return out


def stack_flops(
    model: StackModel,
    x: Tensor,
    *,
    exits: Mapping[int, nn.Module] | None = None,
    gates: Mapping[int, nn.Module] | None = None,
) -> StackFlops:
    """FLOPs per sample of each piece of ``model`` on ``x``, every sample through every piece.

    Args:
        model: a stack model; an :class:`~brickwork.nn.exits.EarlyExit`'s own exits and gates are
            measured unless ``exits`` is given.
        x: (B, ...) a batch of inputs.
        exits: exit heads by body layer index (heads not yet attached to the model).
        gates: a gate per exit, fed that exit's output.
    """
    if exits is None and isinstance(model, EarlyExit):
        exits = {i: model.exits[str(i)] for i in model.exit_layers}
        gates = {i: model.gates[str(i)] for i in model.exit_layers} if model.gates is not None else None
    exits, gates = dict(exits or {}), dict(gates or {})
    n = len(x)
    with _evaluating(model, *exits.values(), *gates.values()):
        h, meter = _metered(model.stem, x)
        out = StackFlops(meter.total / n, [])
        for i, layer in enumerate(model.body.layers):
            h, meter = _metered(layer, h)
            out.layers.append(meter.total / n)
            if i in exits:
                z, meter = _metered(exits[i], h)
                out.exits[i] = meter.total / n
                if i in gates:
                    _, meter = _metered(gates[i], z)
                    out.gates[i] = meter.total / n
        _, meter = _metered(model.head, h)
        out.head = meter.total / n
    return out


# -- nested sub-networks ---------------------------------------------------------------------------


def subnet_flops(
    model: NestedModel, batches: Sequence[Tensor], subnets: Iterable[tuple[float, int | None]] | None = None
) -> dict[tuple[float, int | None], float]:
    """Mean FLOPs per sample of each sub-network of a nested supernet, run inside it.

    Args:
        model: the supernet; its configured width and depth are restored afterwards.
        batches: (B, ...) input batches, reused for every sub-network.
        subnets: ``(width, depth)`` pairs (depth ``None``: full depth); default the trained ones.
    """
    subnets = list(model.subnetworks() if subnets is None else subnets)
    out = {}
    for w, d in subnets:
        with model.at(w, d):
            out[(w, d)] = measure_compute(model, batches).flops_per_sample
    return out


# -- formulas the counter lacks --------------------------------------------------------------------


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
