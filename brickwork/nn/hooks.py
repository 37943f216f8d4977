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
:func:`reset_regrown_state` the last; ``train.train_step`` calls both, and ``train.run_epoch``
calls :func:`after_optimizer_epoch` (``after_epoch``, then the reset) at each epoch's end.
"""

from __future__ import annotations

import torch
from torch import nn


def after_optimizer_step(model: nn.Module, progress: float | None = None) -> None:
    """Call ``after_step()`` and then ``set_progress(progress)`` on every module that has them.

    Args:
        model: the model just updated.
        progress: fraction of training done after this step, in [0, 1]; None leaves schedules alone.
    """
    for module in model.modules():
        hook = getattr(module, "after_step", None)
        if callable(hook):
            hook()
    if progress is not None:
        fraction = min(max(progress, 0.0), 1.0)
        for module in model.modules():
            hook = getattr(module, "set_progress", None)
            if callable(hook):
                hook(fraction)


@torch.no_grad()
def reset_regrown_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Zero ``optimizer``'s per-element state (Adam's moments, SGD's momentum buffer) at the
    positions bricks report through ``take_regrown()``; returns how many positions were reset."""
    n = 0
    for module in model.modules():
        take = getattr(module, "take_regrown", None)
        if not callable(take):
            continue
        for param, where in take():
            for value in optimizer.state.get(param, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    value.masked_fill_(where, 0)
            n += int(where.sum())
    return n


def after_optimizer_epoch(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Call ``after_epoch()`` on every module that has it, then zero the optimizer's state where
    that regrew weights (:func:`reset_regrown_state`, before the next step reads it); returns
    how many positions were reset."""
    for module in model.modules():
        hook = getattr(module, "after_epoch", None)
        if callable(hook):
            hook()
    return reset_regrown_state(model, optimizer)
