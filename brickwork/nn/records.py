"""Where bricks leave what they decided during a forward pass, for the whole model to collect.

A routed or otherwise dynamic brick keeps the same ``forward(x) -> Tensor`` signature as any
module (no signature widening through the stack). What it decided is left on the module:

* ``aux_losses``: a ``dict[str, Tensor]`` of scalar auxiliary losses from the latest forward
  (e.g. ``{"load_balance": ..., "z_loss": ...}``), reset by the brick at each forward;
* ``record``: an object describing the latest decision (routing assignments, load, ...).

:func:`collect_aux_losses` and :func:`collect_records` gather them model-wide in one call;
the training loop adds the auxiliary losses with weights from the config's ``aux_weights``.
A loss the config does not weigh gets the weight its paper trains it with
(:data:`AUX_LOSS_DEFAULTS`, shown by ``brickwork ls``); a loss no paper gives a weight for gets
1.0, so it is never silently dropped.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class AuxLossDefault:
    """The weight an auxiliary loss is trained with when a config does not set it.

    Attributes:
        weight: the coefficient of the loss in the objective.
        source: the paper (and where in it) the weight comes from.
    """

    weight: float
    source: str


# Each auxiliary loss a brick emits, with its paper's weight. Before these defaults every loss
# defaulted to 1.0, which trained the z-loss at 1000x ST-MoE's value and the Switch loss at 100x.
AUX_LOSS_DEFAULTS: dict[str, AuxLossDefault] = {
    # Fedus et al. (2021), Switch Transformers, sec. 2.2: alpha = 1e-2 (also GShard's choice).
    "load_balance": AuxLossDefault(1e-2, "Switch Transformer, Fedus et al. 2021, sec. 2.2 (alpha)"),
    # Zoph et al. (2022), ST-MoE, sec. 3.3 / Table 4: c_z = 1e-3.
    "z_loss": AuxLossDefault(1e-3, "ST-MoE, Zoph et al. 2022, sec. 3.3 (c_z)"),
    # Shazeer et al. (2017), appendix A: w_importance = w_load = 0.1 in their experiments.
    "importance": AuxLossDefault(0.1, "Shazeer et al. 2017, appendix A (w_importance)"),
    "load": AuxLossDefault(0.1, "Shazeer et al. 2017, appendix A (w_load)"),
    # Raposo et al. (2024) give no coefficient for the router's own top-k BCE: 1.0.
    "mod_topk_bce": AuxLossDefault(1.0, "Mixture-of-Depths, Raposo et al. 2024 (no weight given: 1.0)"),
}

# The weight of a loss that no paper gives one for, and that the config does not set.
UNLISTED_AUX_WEIGHT = 1.0


def aux_weight(name: str, weights: dict[str, float] | None = None) -> float:
    """The weight of auxiliary loss ``name``: ``weights[name]`` if set, else its paper's default.

    Args:
        name: the loss's key in a brick's ``aux_losses``.
        weights: a config's ``aux_weights`` (may be None or partial).

    Returns:
        ``weights[name]``; else ``AUX_LOSS_DEFAULTS[name].weight``; else 1.0.
    """
    if weights and name in weights:
        return weights[name]
    default = AUX_LOSS_DEFAULTS.get(name)
    return default.weight if default is not None else UNLISTED_AUX_WEIGHT


def aux_weights_used(names: list[str], weights: dict[str, float] | None = None) -> dict[str, tuple[float, str]]:
    """For a report: each loss's weight and where it came from (``config`` or the paper).

    Returns:
        ``{name: (weight, origin)}`` in the order of ``names``.
    """
    out: dict[str, tuple[float, str]] = {}
    for name in names:
        if weights and name in weights:
            out[name] = (weights[name], "config aux_weights")
        elif name in AUX_LOSS_DEFAULTS:
            out[name] = (AUX_LOSS_DEFAULTS[name].weight, "default: " + AUX_LOSS_DEFAULTS[name].source)
        else:
            out[name] = (UNLISTED_AUX_WEIGHT, "default: no paper weight listed")
    return out


def aux_loss_holders(model: nn.Module) -> tuple[nn.Module, ...]:
    """The modules of ``model`` that have an ``aux_losses`` attribute now (in module order).

    Found once (after a forward: a brick may create the attribute in its first forward), they
    spare the training loop a walk of the whole module tree per step.
    """
    return tuple(m for m in model.modules() if getattr(m, "aux_losses", None) is not None)


def collect_aux_losses(model: nn.Module, holders: Iterable[nn.Module] | None = None) -> dict[str, Tensor]:
    """Sum each named auxiliary loss over all modules of ``model`` (latest forward only).

    Losses are summed over layers, as in Switch Transformer where the per-layer balancing
    losses are added before weighting.

    Args:
        model: the model just run forward.
        holders: the modules to read (:func:`aux_loss_holders`, found once); default: every
            module of ``model``. The sum is the same either way.

    Returns:
        ``{name: scalar}``; empty when no brick produced auxiliary losses.
    """
    total: dict[str, Tensor] = {}
    for module in model.modules() if holders is None else holders:
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

    A loss whose name is not in ``weights`` gets its paper's weight (:func:`aux_weight`), or 1.0
    when none is listed, so a brick's loss is never silently dropped (a failure mode of several
    MoE codebases); set its weight to 0 to switch it off.
    """
    losses = collect_aux_losses(model)
    if not losses:
        return None
    return torch.stack([aux_weight(k, weights) * v for k, v in losses.items()]).sum()
