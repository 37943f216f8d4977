"""Training compute: what a training step costs, and training runs counted as executed.

Every figure comes from the one accounting, :class:`brickwork.analysis.compute.FlopMeter`, run
over real forward and backward passes, so a frozen layer below every trainable one costs only its
forward pass, a frozen weight gets no gradient product, and a ``training_loss`` hook's extra passes
(a teacher's forward, sampled sub-networks) are counted. The optimizer's update is elementwise and
counts nothing under the accounting's convention.

Two ways, for two kinds of model:

* :func:`step_flops` / :func:`flops_per_sample` meter one step on a copy of the model, for
  planning a budget (:func:`epochs_for_budget`) and for static models whose every step costs the
  same per sample (layer-wise growth, specialists, SEMA: ``train.layerwise``);
* :func:`train_counted` meters every step of a real training run, for models whose cost depends on
  the data (routing, exits) and wherever the figure reported is the training's own (``train.assemble``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from brickwork.analysis.compute import FlopMeter
from brickwork.data.base import Split
from brickwork.train.losses import LossFn, build_loss
from brickwork.train.recipe import TrainSettings, train_with


def step_flops(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn) -> int:
    """FLOPs of one training step of ``model`` on ``(x, y)``: forward (or its ``training_loss``
    hook) and backward, as executed for the current ``requires_grad`` flags.

    It runs on a copy in training mode with the RNG state forked, so ``model`` (its gradients,
    batch-norm statistics, sampling state) and the training that follows are untouched.
    """
    probe = copy.deepcopy(model).train()
    objective = getattr(probe, "training_loss", None)
    meter = FlopMeter()
    with torch.random.fork_rng(devices=[]), meter:
        loss = objective(x, y, loss_fn) if callable(objective) else loss_fn(probe(x), y)
        if loss.requires_grad:
            loss.backward()
    return meter.total


def flops_per_sample(model: nn.Module, train: Split, settings: TrainSettings, device: str = "cpu") -> float:
    """Training FLOPs per sample of ``model`` under ``settings``' loss, from one metered step on the
    first full batch of ``train``."""
    n = min(settings.batch_size, len(train))
    x, y = train.x[:n].to(device), train.y[:n].to(device)
    loss_fn = build_loss(settings.loss, label_smoothing=settings.label_smoothing)
    return step_flops(model, x, y, loss_fn) / n


def epochs_for_budget(model: nn.Module, train: Split, settings: TrainSettings, budget: float) -> int:
    """Epochs of ``settings``' batches over ``train`` that cost about ``budget`` training FLOPs (at least 1).

    One metered step (:func:`flops_per_sample`) scaled by the samples per epoch: exact for static
    models, an estimate from that batch's routing for a routed one.
    """
    per_epoch = flops_per_sample(model, train, settings) * len(train)
    return max(1, round(budget / per_epoch))


def train_counted(
    model: nn.Module,
    train: Split,
    settings: TrainSettings,
    *,
    seed: int,
    aux_weights: dict[str, float] | None = None,
    device: str = "cpu",
    progress: bool | None = None,
    desc: str = "train",
) -> tuple[list[dict[str, Any]], int]:
    """Train ``model`` with :func:`~brickwork.train.recipe.train_with` and count the FLOPs of every step.

    The loop runs with an empty validation split, so the meter sees training steps only (forward,
    a ``training_loss`` hook's extra passes such as a teacher's, and backward). Metering every step
    costs time (about 1.7-1.9x a ViT-tiny step on this machine kind); use :func:`flops_per_sample`
    where every step costs the same.

    Returns:
        The loop's history and the FLOPs executed.
    """
    empty = Split(train.x[:0], train.y[:0])
    with FlopMeter() as meter:
        history = train_with(
            model,
            train,
            empty,
            settings,
            seed=seed,
            aux_weights=aux_weights,
            device=device,
            progress=progress,
            desc=desc,
        )
    return history, meter.total
