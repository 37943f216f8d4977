"""A training recipe as data, and the one function that trains a model with it.

:class:`TrainSettings` is what a config sets about training: the ``train`` stage's keys, and
those of every stage that trains a model of its own (``nested_baselines`` trains a separate
model per sub-network with them). Configs set its fields flat (``{stage: train, epochs: 8,
lr: 0.003}``). :func:`train_with` turns it into an optimizer, a loss and a
:class:`~brickwork.train.loop.FitConfig` (the loop's own settings plus the run's seed, device
and auxiliary-loss weights) and calls :func:`~brickwork.train.loop.fit`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import pydantic
from pydantic.dataclasses import dataclass
from torch import nn

from brickwork.data.base import Split
from brickwork.distributed.data_parallel import Strategy, gathered, wrap
from brickwork.distributed.process_group import current
from brickwork.registry import RegistryName
from brickwork.train.loop import FitConfig, NonFinitePolicy, fit
from brickwork.train.losses import build_loss
from brickwork.train.optim import Schedule, build_optimizer


@dataclass(frozen=True, config=pydantic.ConfigDict(extra="forbid"))
class TrainSettings:
    """How a model is trained on the train split, validated after every epoch.

    Attributes:
        epochs: passes over the train split.
        batch_size: samples per optimizer step.
        optimizer: a registered optimizer (``brickwork ls optimizer``).
        lr: peak learning rate.
        weight_decay: the optimizer's weight decay.
        schedule: learning-rate schedule over the steps (``constant`` or ``cosine``).
        warmup_steps: linear warm-up steps before the schedule.
        loss: a registered task loss (``brickwork ls loss``).
        label_smoothing: label smoothing of the loss.
        grad_clip: clip the gradient norm to this value (None: no clipping).
        nonfinite: what a NaN or inf training loss does: ``stop`` the run (it is recorded as
            failed, naming the epoch and step) or ``skip_batch`` (that batch is not applied;
            an epoch in which every batch is skipped still stops the run).
        data_parallel: how several processes (``torchrun``) share a step: ``ddp`` (replicated
            weights, all-reduced gradients) or ``fsdp`` (FSDP2: weights, gradients and optimizer
            state sharded). Either way the step equals the single-process step on the whole
            batch; a single process ignores it.
        expert_parallel: under ``torchrun``, shard every MoE layer's experts over groups of this
            many ranks (expert parallelism; the W ranks form a ``(W / P, P)`` dp x ep mesh: experts
            split over ep, everything else data-parallel over all W ranks), with the routers'
            auxiliary losses and load taken over the global batch. It must divide the world size
            and every MoE's expert count, and the routers must be causal (token-choice, no
            capacity limit). None: every rank holds every expert. A single process ignores it.
    """

    epochs: Annotated[int, pydantic.Field(ge=1)] = 10
    batch_size: Annotated[int, pydantic.Field(ge=1)] = 64
    optimizer: Annotated[str, RegistryName("optimizer")] = "adamw"
    lr: Annotated[float, pydantic.Field(gt=0)] = 1e-3
    weight_decay: Annotated[float, pydantic.Field(ge=0)] = 0.01
    schedule: Schedule = "cosine"
    warmup_steps: Annotated[int, pydantic.Field(ge=0)] = 0
    loss: Annotated[str, RegistryName("loss")] = "cross_entropy"
    label_smoothing: Annotated[float, pydantic.Field(ge=0, lt=1)] = 0.0
    grad_clip: Annotated[float, pydantic.Field(gt=0)] | None = None
    nonfinite: NonFinitePolicy = "stop"
    data_parallel: Strategy = "ddp"
    expert_parallel: Annotated[int, pydantic.Field(ge=1)] | None = None

    def fit_config(self, *, seed: int, aux_weights: dict[str, float] | None = None, device: str = "cpu") -> FitConfig:
        """The loop's settings: these, with the run's ``seed`` (batch order), device and aux weights."""
        return FitConfig(
            epochs=self.epochs,
            batch_size=self.batch_size,
            seed=seed,
            schedule=self.schedule,
            warmup_steps=self.warmup_steps,
            aux_weights=dict(aux_weights or {}),
            grad_clip=self.grad_clip,
            device=device,
            nonfinite=self.nonfinite,
        )


DEFAULT_TRAINING = TrainSettings()  # frozen: safe to share as an argument default


def train_with(
    model: nn.Module,
    train: Split,
    val: Split,
    settings: TrainSettings,
    *,
    seed: int,
    aux_weights: dict[str, float] | None = None,
    device: str = "cpu",
    state_path: Path | None = None,
    progress: bool | None = None,
    desc: str = "train",
    log_dir: Path | None = None,
) -> list[dict[str, Any]]:
    """Train ``model`` (in place) on ``train`` with ``settings``, validating on ``val`` after every epoch.

    Args:
        model: the model to train.
        train, val: the splits.
        settings: the recipe.
        seed: batch order is a pure function of (seed, epoch).
        aux_weights: weights of the bricks' auxiliary losses (default 1.0 each).
        device: where the batches go.
        state_path: with it, the training state is saved after every epoch and resumed from.
        progress: show a progress bar (default: when stderr is a terminal).
        desc: the progress bar's label.
        log_dir: TensorBoard folder for this training's curves (``fit``; None: none).

    Returns:
        The per-epoch history of :func:`~brickwork.train.loop.fit`.

    Under ``torchrun`` (``distributed.current()`` has several ranks) the model is trained
    data-parallel with ``settings.data_parallel`` (and ``settings.expert_parallel``), and ends with
    the trained weights on every rank.
    """
    engine = wrap(model, current(), settings.data_parallel, settings.expert_parallel)
    opt = build_optimizer(settings.optimizer, engine.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    loss_fn = build_loss(settings.loss, label_smoothing=settings.label_smoothing)
    cfg = settings.fit_config(seed=seed, aux_weights=aux_weights, device=device)
    history = fit(
        engine, train, val, loss_fn, opt, cfg, state_path=state_path, progress=progress, desc=desc, log_dir=log_dir
    )
    gathered(engine)  # FSDP2 trained a sharded copy: its weights come back into `model`
    return history
