"""Checks before any work: every model variant builds for the data and takes a batch of its shape.

A config can be valid key by key and still not run: an ``(N, 4)`` table fed to a CNN, a
``top_k`` above the number of experts, a width of ``10**30``, a typo inside a nested spec that
only the builder reads. :func:`check_models` finds these for ``validate`` and before ``run``
creates anything, at (almost) no cost:

1. The model is built on the meta device (shapes without memory) and given one meta batch of
   the data's per-sample shape. Its parameter count is checked against this machine's memory.
2. Some bricks compute indices from data (``bincount``, ``nonzero``, a random wiring), which
   meta tensors cannot do. When the meta pass stops at such an operation, the model is built
   for real on the CPU, with every single allocation bounded (:class:`_AllocationBound`), and
   run without gradients on two real samples.

Any failure becomes one :class:`~brickwork.errors.ConfigError` at ``models.<label>``.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from brickwork.data.base import Dataset
from brickwork.errors import BrickworkError, ConfigError, shorten
from brickwork.experiment.build import build_model
from brickwork.experiment.config import RunConfig, Spec

#: Errors a builder or a forward pass raises for arguments that do not fit together.
_BUILD_ERRORS = (ValueError, TypeError, RuntimeError, OverflowError, IndexError, ZeroDivisionError, AssertionError)


def check_models(cfg: RunConfig, data: Dataset) -> None:
    """Build each of ``cfg``'s model variants for ``data`` and run one batch of its shape.

    Raises:
        ConfigError: a variant cannot be built, is too large for this machine, or fails on the input.
    """
    sample = data.train.x[:2]
    for label, spec in cfg.models.items():
        check_model(spec, tuple(data.in_shape), data.num_classes, sample, f"models.{label}")
    check_expert_parallel_stages(cfg, data)


def check_expert_parallel_stages(cfg: RunConfig, data: Dataset) -> None:
    """A stage's ``expert_parallel: P`` fits every model variant (MoE layers, causal routers, P
    dividing their experts) and, under ``torchrun``, the world size.

    The world size is only known once launched: ``validate`` in one process checks the models.

    Raises:
        ConfigError: at ``stages[i].expert_parallel``, one line naming what does not fit.
    """
    from brickwork.distributed import current
    from brickwork.distributed.expert_parallel import check_expert_parallel
    from brickwork.train.recipe import TrainSettings

    world = current().world_size
    for i, stage in enumerate(cfg.stages):
        degrees = {s.expert_parallel for s in stage.args.values() if isinstance(s, TrainSettings)} - {None}
        for degree in sorted(d for d in degrees if d is not None):
            where = f"stages[{i}].expert_parallel"
            if world > 1 and world % degree:
                raise ConfigError(
                    where,
                    f"{degree} does not divide the world size {world} (the ranks form a data-parallel x"
                    f" expert-parallel mesh); use a divisor of {world}",
                    show_value=False,
                )
            for label, spec in cfg.models.items():
                state = torch.random.get_rng_state()  # the run's own draws stay as they were
                try:
                    with warnings.catch_warnings(), torch.device("meta"):
                        warnings.simplefilter("ignore")
                        model = build_model(spec, tuple(data.in_shape), data.num_classes)
                finally:
                    torch.random.set_rng_state(state)
                try:
                    check_expert_parallel(model, degree, f"models.{label}")
                except BrickworkError as e:
                    raise ConfigError(where, str(e), show_value=False) from None


def check_model(spec: Spec, in_shape: Sequence[int], num_classes: int, sample: torch.Tensor, where: str) -> None:
    """See :func:`check_models`; ``sample`` is a real (B, *in_shape) batch for the fallback pass."""
    shape = f"input shape {tuple(in_shape)}, {num_classes} classes"
    state = torch.random.get_rng_state()  # building draws random numbers; the run's own draws stay as they were
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # loading weights into meta tensors warns that it is a no-op
            try:
                with torch.device("meta"):
                    _build_and_run(spec, in_shape, num_classes, sample.to("meta"), shape, where)
            except _MetaUnsupported:
                with _AllocationBound(_memory_bytes() // 2, where), torch.no_grad():
                    _build_and_run(spec, in_shape, num_classes, sample, shape, where)
    finally:
        torch.random.set_rng_state(state)


def _build_and_run(
    spec: Spec, in_shape: Sequence[int], num_classes: int, x: torch.Tensor, shape: str, where: str
) -> None:
    model = _step(where, f"cannot be built for {shape}", lambda: build_model(spec, in_shape, num_classes))
    _check_size(model, where)
    _step(where, f"fails on a batch of {shape}", lambda: _forward(model, x))


class _MetaUnsupported(Exception):
    """The meta pass reached an operation meta tensors cannot run; fall back to a bounded real pass."""


def _step(where: str, what: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except BrickworkError:
        raise
    except NotImplementedError as e:
        raise _MetaUnsupported from e
    except _BUILD_ERRORS as e:
        if _on_meta(e):
            raise _MetaUnsupported from e
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if isinstance(e, OverflowError) or "overflow" in first.lower():
            first = f"a size is too large to allocate ({first})"
        raise ConfigError(where, f"the model {what}: {shorten(first)}", show_value=False) from None


def _on_meta(e: BaseException) -> bool:
    """Whether ``e`` is about meta tensors themselves (not about the model's arguments)."""
    text = str(e).lower()
    return "meta" in text or "data-dependent" in text or "data dependent" in text


def _forward(model: nn.Module, x: torch.Tensor) -> None:
    model.eval()
    with torch.no_grad():
        model(x)


def _check_size(model: nn.Module, where: str) -> None:
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    limit = _memory_bytes()
    if total > limit:
        count = sum(p.numel() for p in model.parameters())
        raise ConfigError(
            where,
            f"the model would have {count:.3g} parameters ({total / 2**30:.3g} GiB), more than this "
            f"machine's memory ({limit / 2**30:.3g} GiB); reduce its widths or depth",
            show_value=False,
        )


def _memory_bytes() -> int:
    """Physical memory of this machine (a generous bound on what a model may take)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 64 * 2**30


_FACTORIES = {torch.empty, torch.zeros, torch.ones, torch.rand, torch.randn, torch.full, torch.randint}


class _AllocationBound(TorchFunctionMode):
    """Refuse any single new tensor larger than ``limit`` bytes before it is allocated."""

    def __init__(self, limit: int, where: str) -> None:
        super().__init__()
        self.limit = limit
        self.where = where

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _FACTORIES:
            numel = _requested_numel(func, args, kwargs)
            if numel is not None and numel * 4 > self.limit:
                raise ConfigError(
                    self.where,
                    f"the model asks for a tensor of {numel:.3g} values, more than this machine's memory holds; "
                    "reduce its widths",
                    show_value=False,
                )
        return func(*args, **kwargs)


def _requested_numel(func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> int | None:
    """Values the factory call would allocate, or None where its size cannot be read."""
    dims: Any
    if func is torch.randint:
        dims = args[-1] if args else kwargs.get("size")
    elif func is torch.full:
        dims = args[0] if args else kwargs.get("size")
    else:
        dims = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else args
        dims = kwargs.get("size", dims)
    try:
        return math.prod(int(d) for d in dims)
    except (TypeError, ValueError):
        return None
