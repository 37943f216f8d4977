"""What the training loop tells bricks between steps, without widening any signature.

Bricks that need to know about training define, as plain methods (duck-typed):

* ``training_loss(x, y, loss_fn) -> Tensor`` (on the model passed to the loop): replaces
  ``loss_fn(model(x), y)`` for models whose objective is more than one forward pass — a
  weighted sum of early-exit losses, sub-networks sampled per step (SortedNet), a distillation
  term. The loop still adds the bricks' auxiliary losses on top.
* ``set_progress(fraction)``: where training is, from 0.0 to 1.0; schedules read it (a
  dense-to-sparse gate's temperature, a pruning schedule, a capacity decay).
* ``after_step()``: called once after every optimizer step, while the step's gradients are
  still in ``.grad`` — load-balancing biases, prune/regrow of sparse connectivity, running
  activation statistics.

* ``after_epoch()``: called once at the end of every training epoch (SET's rewiring after each
  epoch, Mocanu et al., 2018).

* ``take_regrown() -> list[(parameter, bool mask)]``: positions of a parameter that were just
  regrown (sparse rewiring), so the loop zeroes the optimizer's state there: a regrown weight
  starts at zero and should not inherit the moments of the connection that used to sit in its
  slot (RigL, Evci et al., 2020, resets them too). Returns each position once, then forgets it.

:func:`after_optimizer_step` makes the first two calls model-wide and
:func:`reset_regrown_state` the third; ``train.train_step`` calls both, through a
:class:`ModelHooks` found once per epoch, and ``train.run_epoch`` calls
:func:`after_optimizer_epoch` (``after_epoch``, then the reset) at each epoch's end.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class ModelHooks:
    """The training hooks of a model's modules, found once.

    Walking the module tree for every hook at every step costs more than a small model's whole
    optimizer step (issue 16: about 0.3 ms per step for a 5-layer MLP, four ``modules()`` walks
    and a failed ``getattr`` per module per walk). The training loop finds the hooks once per
    epoch; bricks are not added or removed during an optimizer step. Calls are made in the
    module order of ``model.modules()``, as :func:`after_optimizer_step` makes them.
    """

    __slots__ = ("after_step", "set_progress", "take_regrown")

    def __init__(self, model: nn.Module) -> None:
        modules = list(model.modules())
        self.after_step = _bound(modules, "after_step")
        self.set_progress = _bound(modules, "set_progress")
        self.take_regrown = _bound(modules, "take_regrown")

    def after_optimizer_step(self, progress: float | None = None) -> None:
        """``after_step()`` on every module that has it, then ``set_progress(progress)``."""
        for hook in self.after_step:
            hook()
        if progress is not None and self.set_progress:
            fraction = min(max(progress, 0.0), 1.0)
            for hook in self.set_progress:
                hook(fraction)

    @torch.no_grad()
    def reset_regrown_state(self, optimizer: torch.optim.Optimizer) -> int:
        """Zero ``optimizer``'s per-element state where bricks regrew weights; returns how many."""
        n = 0
        for take in self.take_regrown:
            for param, where in take():
                for value in optimizer.state.get(param, {}).values():
                    if isinstance(value, torch.Tensor) and value.shape == param.shape:
                        value.masked_fill_(where, 0)
                n += int(where.sum())
        return n


def _bound(modules: list[nn.Module], name: str) -> tuple[Callable[..., Any], ...]:
    return tuple(hook for m in modules if callable(hook := getattr(m, name, None)))


def after_optimizer_step(model: nn.Module, progress: float | None = None) -> None:
    """Call ``after_step()`` and then ``set_progress(progress)`` on every module that has them.

    Args:
        model: the model just updated.
        progress: fraction of training done after this step, in [0, 1]; None leaves schedules alone.
    """
    ModelHooks(model).after_optimizer_step(progress)


def reset_regrown_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Zero ``optimizer``'s per-element state (Adam's moments, SGD's momentum buffer) at the
    positions bricks report through ``take_regrown()``; returns how many positions were reset."""
    return ModelHooks(model).reset_regrown_state(optimizer)


def after_optimizer_epoch(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Call ``after_epoch()`` on every module that has it, then zero the optimizer's state where
    that regrew weights (:func:`reset_regrown_state`, before the next step reads it); returns
    how many positions were reset."""
    hooks = ModelHooks(model)
    for hook in _bound(list(model.modules()), "after_epoch"):
        hook()
    return hooks.reset_regrown_state(optimizer)
