"""Training in phases that each train a chosen part of a model, with the training FLOPs each spent.

Layer-wise growth (``ops.layerwise``), specialists for composition and SEMA's adapters all train
part of a model while the rest stays frozen. What such a phase costs is not 3x the forward pass:
autograd skips the backward pass of frozen layers below every trainable one and the weight
gradients of every frozen parameter. :func:`brickwork.train.budget.flops_per_sample` therefore
meters one real training step (forward and backward, as executed for the current
``requires_grad`` flags) with the one accounting. The models these phases train are static (no
routing, no exits), so every step costs ``step FLOPs per sample x its batch size``;
:func:`train_phase` multiplies the metered figure by the samples the phase trains on (epochs x
training samples).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from brickwork.analysis.compute import count_params
from brickwork.data.base import Split
from brickwork.ops.layerwise import set_trainable_
from brickwork.train.budget import flops_per_sample
from brickwork.train.recipe import TrainSettings, train_with


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
    log_dir: Path | None = None,
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
        aux_weights, progress, desc, log_dir: as for ``train_with`` (``log_dir``: this phase's
            TensorBoard folder, or None).

    Raises:
        BrickworkError: no parameter matches ``trainable``.
    """
    set_trainable_(model, trainable)
    per_sample = flops_per_sample(model, train, settings, device)
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
        log_dir=log_dir,
    )
    return PhaseResult(count_params(model, trainable_only=True), per_sample, settings.epochs * len(train), history)
