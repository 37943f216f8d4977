"""Training in phases that each train a chosen part of a model, with the training FLOPs each spent.

Layer-wise growth (``ops.layerwise``), specialists for composition and SEMA's adapters all train
part of a model while the rest stays frozen. What such a phase costs is not 3x the forward pass:
autograd skips the backward pass of frozen layers below every trainable one and the weight
gradients of every frozen parameter. :func:`step_flops` therefore meters one real training step
(forward and backward, as executed for the current ``requires_grad`` flags) with the one
accounting, :class:`brickwork.analysis.compute.FlopMeter`. The models these phases train are
static (no routing, no exits), so a step's FLOPs are linear in its batch size and every step of
the phase costs ``step FLOPs per sample x its batch size``; :func:`train_phase` multiplies the
metered figure by the samples the phase trains on (epochs x training samples).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from brickwork.analysis.compute import FlopMeter, count_params
from brickwork.data.base import Split
from brickwork.ops.layerwise import set_trainable_
from brickwork.train.losses import LossFn, build_loss
from brickwork.train.recipe import TrainSettings, train_with


def step_flops(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn) -> int:
    """FLOPs of one training step's forward and backward pass on ``(x, y)``, as executed.

    Only what autograd runs is counted: frozen layers below every trainable parameter get no
    backward pass and frozen weights no gradient. The optimizer update (elementwise) counts
    nothing under the accounting's convention. Gradients and the RNG state are restored, so
    the measurement does not change the training that follows.
    """
    saved = {id(p): p.grad for p in model.parameters()}
    was_training = model.training
    model.train()
    meter = FlopMeter()
    with torch.random.fork_rng(devices=[]), meter:
        loss = loss_fn(model(x), y)
        if loss.requires_grad:
            loss.backward()
    for p in model.parameters():
        p.grad = saved[id(p)]
    model.train(was_training)
    return meter.total


@dataclass
class PhaseResult:
    """What one training phase did and cost.

    Attributes:
        trainable: parameters it trained.
        step_flops_per_sample: training FLOPs per sample of one step (forward + backward).
        samples: training samples it stepped over (epochs x train size).
        history: the per-epoch history of the training loop.
    """

    trainable: int
    step_flops_per_sample: float
    samples: int
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def flops(self) -> float:
        """Training FLOPs of the whole phase."""
        return self.step_flops_per_sample * self.samples


def phase_flops_per_sample(model: nn.Module, train: Split, settings: TrainSettings, device: str = "cpu") -> float:
    """Training FLOPs per sample of ``model`` with its current ``requires_grad`` flags (one metered step)."""
    n = min(settings.batch_size, len(train))
    x, y = train.x[:n].to(device), train.y[:n].to(device)
    loss_fn = build_loss(settings.loss, label_smoothing=settings.label_smoothing)
    return step_flops(model, x, y, loss_fn) / n


def train_phase(
    model: nn.Module,
    trainable: Sequence[str],
    train: Split,
    val: Split,
    settings: TrainSettings,
    *,
    seed: int,
    device: str = "cpu",
    state_path: Path | None = None,
    aux_weights: dict[str, float] | None = None,
    progress: bool | None = None,
    desc: str = "phase",
) -> PhaseResult:
    """Freeze ``model`` except the parameters matching the globs ``trainable``, train it (in place).

    Args:
        model: the model; its ``requires_grad`` flags are left as the phase set them.
        trainable: globs of parameter paths to train (``ops.layerwise.set_trainable_``).
        train, val: the splits.
        settings: the recipe of this phase.
        seed: batch order (pure function of seed and epoch).
        device: where batches go.
        state_path: saved after every epoch and resumed from (``train.recipe.train_with``).
        aux_weights, progress, desc: as for ``train_with``.

    Raises:
        BrickworkError: no parameter matches ``trainable``.
    """
    set_trainable_(model, trainable)
    per_sample = phase_flops_per_sample(model, train, settings, device)
    history = train_with(
        model,
        train,
        val,
        settings,
        seed=seed,
        aux_weights=aux_weights,
        device=device,
        state_path=state_path,
        progress=progress,
        desc=desc,
    )
    return PhaseResult(count_params(model, trainable_only=True), per_sample, settings.epochs * len(train), history)
