"""Early exits measured offline: every exit's outputs computed once, each threshold's exits
decided by the brick's own rule, each path priced with FLOPs counted by the dispatcher.

A threshold sweep needs the model's decision at many thresholds; running the compacting forward
at each would repeat the whole evaluation. Instead every exit's output is computed once for
every sample (:func:`exit_outputs`), each sample's exit at a threshold is decided by
:func:`brickwork.nn.exits.choose_exit` (the rule the compacting forward calls, so the two agree
exactly, tested), and the cost of each path is the sum of the pieces it runs
(:func:`path_costs`, pieces from :func:`brickwork.analysis.compute.stack_flops`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from brickwork.analysis.calibration import expected_calibration_error
from brickwork.analysis.compute import StackFlops
from brickwork.data.base import Split
from brickwork.data.batching import input_batches
from brickwork.nn.exits import EarlyExit, ExitPolicy, choose_exit
from brickwork.nn.modes import evaluating


@torch.no_grad()
def exit_outputs(model: EarlyExit, split: Split, batch_size: int, device: str) -> list[Tensor]:
    """Outputs of every exit and then the final head on every sample of ``split`` (on the CPU).

    Returns:
        One (N, ...) tensor per exit, then the final head's, e.g. (N, K) or (N, T, V).
    """
    with evaluating(model):
        outs = [[z.cpu() for z in model.all_exits(x)] for x in input_batches(split.x, batch_size, device=device)]
    return [torch.cat([o[k] for o in outs]) for k in range(len(outs[0]))]


@torch.no_grad()
def exit_scores(model: EarlyExit, outs: list[Tensor]) -> list[Tensor]:
    """Each exit's (N,) scores under the model's current policy, from :func:`exit_outputs`."""
    return [model.score(layer, outs[k]).cpu() for k, layer in enumerate(model.exit_layers)]


def simulate(scores: list[Tensor], outs: list[Tensor], y: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """Where each sample leaves and whether its answer there is right, as the compacting forward decides.

    Args:
        scores: each exit's (N,) scores (:func:`exit_scores`).
        outs: each exit's and then the final head's outputs (:func:`exit_outputs`).
        y: (N,) or (N, T) targets.
        threshold: the exit threshold.

    Returns:
        ``(where, hit)``: (N,) index into ``outs``, and (N,) or (N, T) float 1.0 where right.
    """
    where = choose_exit(scores, threshold)  # len(scores) is the final head, the last of ``outs``
    pred = torch.stack([z.argmax(-1) for z in outs])  # (exits + 1, N, ...)
    chosen = pred.gather(0, where.view(1, -1, *[1] * (pred.dim() - 2)).expand(1, *pred.shape[1:]))[0]
    return where, (chosen == y).float()


def path_costs(model: EarlyExit, pieces: StackFlops, policy: ExitPolicy) -> list[float]:
    """FLOPs per sample of leaving at each exit and at the end, scoring every exit on the way
    (and, with ``policy="gate"``, running its gate)."""
    costs, running = [], pieces.stem
    for i in range(len(model.body)):
        running += pieces.layers[i]
        if i in pieces.exits:
            running += pieces.exits[i] + (pieces.gates[i] if policy == "gate" else 0.0)
            costs.append(running)
    return [*costs, running + pieces.head]


def select(sweep: list[dict[str, Any]], max_drop: float, target_saving: float | None) -> dict[str, Any]:
    """The operating point of a threshold sweep, chosen on validation numbers.

    With a FLOPs budget (``target_saving``): the most accurate threshold saving at least that
    share, as budgeted early-exit inference chooses (Huang et al., 2018, MSDNet); without one, or
    if no threshold saves that much: the fewest FLOPs within ``max_drop`` of the full model.
    ``sweep[0]`` is the full model (threshold 1.0); each point has ``val_accuracy`` and ``val_flops``.
    """
    full = sweep[0]
    if target_saving is not None:
        within = [p for p in sweep if p["val_flops"] <= (1 - target_saving) * full["val_flops"]]
        if within:
            return max(within, key=lambda p: (p["val_accuracy"], -p["val_flops"]))
    ok = [p for p in sweep if p["val_accuracy"] >= full["val_accuracy"] - max_drop]
    return min(ok, key=lambda p: (p["val_flops"], -p["val_accuracy"]))


@torch.no_grad()
def exit_shares(model: EarlyExit, split: Split, batch_size: int, device: str) -> dict[int, float]:
    """Share of samples leaving after each body layer, by the compacting forward at the current threshold."""
    layers = []
    with evaluating(model):
        for x in input_batches(split.x, batch_size, device=device):
            model(x)
            assert model.record is not None
            layers.append(model.record.layer.cpu())
    every = torch.cat(layers)
    return {int(v): float((every == v).float().mean()) for v in every.unique()}


def per_exit(outs: list[Tensor], y: Tensor, layers: list[int], bins: int) -> list[dict[str, Any]]:
    """Accuracy and expected calibration error of every exit (and the final head) on all samples.

    Args:
        outs: each exit's and then the final head's outputs (:func:`exit_outputs`).
        y: (N,) or (N, T) targets.
        layers: the body layer of each entry of ``outs`` (the last one for the final head).
        bins: confidence bins of the ECE.
    """
    return [
        {
            "layer": layer,
            "exit": "final" if k == len(outs) - 1 else f"exit {layer}",
            "accuracy": float((z.argmax(-1) == y).float().mean()),
            "ece": expected_calibration_error(z, y, bins),
        }
        for k, (z, layer) in enumerate(zip(outs, layers, strict=True))
    ]
