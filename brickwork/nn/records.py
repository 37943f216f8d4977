"""Where bricks leave what they decided during a forward pass, for the whole model to collect.

A routed or otherwise dynamic brick keeps the same ``forward(x) -> Tensor`` signature as any
module (no signature widening through the stack). What it decided is left on the module:

* ``aux_losses``: a ``dict[str, Tensor]`` of scalar auxiliary losses from the latest forward
  (e.g. ``{"load_balance": ..., "z_loss": ...}``), reset by the brick at each forward;
* ``record``: an object describing the latest decision (routing assignments, load, ...).

:func:`collect_aux_losses` and :func:`collect_records` gather them model-wide in one call;
the training loop adds the auxiliary losses with weights from the config.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def collect_aux_losses(model: nn.Module) -> dict[str, Tensor]:
    """Sum each named auxiliary loss over all modules of ``model`` (latest forward only).

    Losses are summed over layers, as in Switch Transformer where the per-layer balancing
    losses are added before weighting.

    Returns:
        ``{name: scalar}``; empty when no brick produced auxiliary losses.
    """
    total: dict[str, Tensor] = {}
    for module in model.modules():
        losses = getattr(module, "aux_losses", None)
        if not losses:
            continue
        for name, value in losses.items():
            total[name] = total[name] + value if name in total else value
    return total


def collect_records(model: nn.Module) -> dict[str, Any]:
    """The latest ``record`` of every module that has one, keyed by module path."""
    return {
        name: module.record for name, module in model.named_modules() if getattr(module, "record", None) is not None
    }


def weighted_aux_loss(model: nn.Module, weights: dict[str, float]) -> Tensor | None:
    """``sum(weights[name] * loss)`` over the collected auxiliary losses; None if there are none.

    A loss whose name is not in ``weights`` gets weight 1.0, so a brick's loss is never silently
    dropped (a failure mode of several MoE codebases); set its weight to 0 to switch it off.
    """
    losses = collect_aux_losses(model)
    if not losses:
        return None
    return torch.stack([weights.get(k, 1.0) * v for k, v in losses.items()]).sum()
