"""Deep Model Assembling and m2mKD: the two methods that train modules inside a shared meta model.

The structure they work on (dividing a model, fitting a module to a meta-model position, the hybrid,
assembling) is :mod:`brickwork.ops.assemble`; see its docstring for the papers, what is followed and
what is simplified. Every training run here is counted as executed
(:func:`brickwork.train.budget.train_counted`).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from brickwork.data.base import Split
from brickwork.nn.meta import MetaHybrid, ModuleDistillation, Piece
from brickwork.nn.stack import StackModel
from brickwork.ops.assemble import assemble, divide, fitted_modules, meta_hybrid, split_model
from brickwork.train.budget import train_counted
from brickwork.train.distill.losses import kd_divergence
from brickwork.train.loop import evaluate
from brickwork.train.losses import build_loss
from brickwork.train.recipe import TrainSettings

# -- training, counted -----------------------------------------------------------------------------


@dataclass
class Phase:
    """One training run of a method: what was trained, its executed training FLOPs, its history."""

    name: str
    flops: int
    history: list[dict[str, Any]] = field(default_factory=list)
    val_accuracy: float | None = None


def logit_kd(temperature: float) -> Callable[[Tensor, Tensor], Tensor]:
    """Hinton et al.'s soft-target term ``tau^2 * KL(p_teacher || p_student)``, batch mean over every
    row of (B, K) or (B, T, K) logits: :func:`brickwork.train.distill.losses.kd_divergence`."""

    def kd(student: Tensor, teacher: Tensor) -> Tensor:
        return kd_divergence(student, teacher, temperature)

    return kd


# -- the two methods -------------------------------------------------------------------------------


@dataclass
class Trainer:
    """What every phase shares: the data, the seed, the device, the bricks' auxiliary-loss weights."""

    train: Split
    val: Split
    seed: int
    device: str = "cpu"
    aux_weights: dict[str, float] = field(default_factory=dict)
    progress: bool | None = None

    def run(
        self, name: str, model: nn.Module, settings: TrainSettings, epochs: int, objective: nn.Module | None = None
    ) -> Phase:
        """Train ``objective`` (default ``model``) for ``epochs``; validate ``model`` once afterwards."""
        torch.manual_seed(self.seed)
        history, flops = train_counted(
            objective if objective is not None else model,
            self.train,
            dataclasses.replace(settings, epochs=epochs),
            seed=self.seed,
            aux_weights=self.aux_weights,
            device=self.device,
            progress=self.progress,
            desc=name,
        )
        return Phase(name, flops, history, self.accuracy(model))

    @torch.no_grad()
    def accuracy(self, model: nn.Module) -> float | None:
        """Accuracy of ``model`` on the validation split (None when it is empty)."""
        if not len(self.val):
            return None
        return evaluate(model, self.val, build_loss("cross_entropy"), device=self.device)["accuracy"]


@dataclass
class Assembled:
    """A method's result: the final model, the trained meta model, and each training phase."""

    model: StackModel
    meta: StackModel
    phases: list[Phase]
    incubated: float | None = None  # validation accuracy of the assembly before fine-tuning

    @property
    def train_flops(self) -> int:
        return sum(p.flops for p in self.phases)


#: The name of the meta model's pre-training phase.
PRETRAIN = "meta model (PT)"


def pretrain_meta(meta: StackModel, modules: int, trainer: Trainer, settings: TrainSettings, epochs: int) -> Phase:
    """Train the meta model end to end (Deep-Incubation's PT phase); ``meta`` must have ``modules`` layers
    or more (it is divided like the target)."""
    divide(len(meta.body), modules, "meta model")
    return trainer.run(PRETRAIN, meta, settings, epochs)


def _meta_ready(
    meta: StackModel, modules: int, trainer: Trainer, settings: TrainSettings, epochs: int, trained: bool
) -> tuple[StackModel, list[Piece], list[Phase]]:
    """A copy of ``meta``, pre-trained unless ``trained`` or ``epochs`` is 0; its pieces; the phases run."""
    meta = copy.deepcopy(meta)
    phases = [pretrain_meta(meta, modules, trainer, settings, epochs)] if not trained and epochs > 0 else []
    return meta, split_model(meta, modules, "meta model"), phases


def _assembled(
    pieces: Sequence[Piece],
    meta: StackModel,
    phases: list[Phase],
    trainer: Trainer,
    settings: TrainSettings,
    epochs: int,
    name: str,
) -> Assembled:
    """The trained modules assembled, validated once, then trained end to end for ``epochs``."""
    model = assemble(pieces)
    incubated = trainer.accuracy(model)
    if epochs:
        phases.append(trainer.run(name, model, settings, epochs))
    return Assembled(model, meta, phases, incubated)


def deep_model_assembling(
    target: StackModel,
    meta: StackModel,
    modules: int,
    trainer: Trainer,
    settings: TrainSettings,
    *,
    meta_epochs: int,
    module_epochs: int,
    finetune_epochs: int,
    meta_trained: bool = False,
) -> Assembled:
    """Deep Model Assembling: pre-train ``meta`` (unless ``meta_trained`` or ``meta_epochs`` is 0), train
    each of ``target``'s ``modules`` modules in its position of the meta model on the task loss,
    assemble, fine-tune.

    Copies: ``target`` and ``meta`` are not changed (the meta model is trained on a copy).

    Raises:
        AssembleError: ``modules`` above either depth, or a module whose shapes do not match the meta
            model's at its position.
    """
    probe = trainer.train.x[:2].to(trainer.device)
    pieces, _ = fitted_modules(target, meta, modules, probe, adapters=None, role="target")  # before any training
    meta, meta_pieces, phases = _meta_ready(meta, modules, trainer, settings, meta_epochs, meta_trained)
    for i, piece in enumerate(pieces):
        phases.append(trainer.run(f"module {i} (MT)", meta_hybrid(meta_pieces, i, piece), settings, module_epochs))
    return _assembled(pieces, meta, phases, trainer, settings, finetune_epochs, "assembled (FT)")


def module_to_module_kd(
    teacher: StackModel,
    student: StackModel,
    meta: StackModel,
    modules: int,
    trainer: Trainer,
    settings: TrainSettings,
    *,
    meta_epochs: int,
    module_epochs: int,
    finetune_epochs: int,
    alpha: float = 0.5,
    temperature: float = 1.0,
    adapters: bool = False,
    meta_trained: bool = False,
) -> Assembled:
    """m2mKD: train each of ``student``'s ``modules`` modules to match ``teacher``'s module in the same
    position of the meta model, assemble the student, train it end to end on labels.

    The teacher's modules must fit the meta model as they are (m2mKD incubates them in it first, as
    Deep Model Assembling does: run that on the teacher with the same meta model); a student module
    whose width differs gets stitch layers when ``adapters`` is on. Copies: no input is changed.

    Raises:
        AssembleError: ``modules`` above a depth, or a module that does not fit its position (for a
            student without ``adapters``, or a teacher).
    """
    probe = trainer.train.x[:2].to(trainer.device)
    t_pieces, _ = fitted_modules(teacher, meta, modules, probe, adapters=None, role="teacher")
    s_pieces, s_slots = fitted_modules(student, meta, modules, probe, adapters=adapters, role="student")
    meta, meta_pieces, phases = _meta_ready(meta, modules, trainer, settings, meta_epochs, meta_trained)
    kd = logit_kd(temperature)
    for i, (t, slot) in enumerate(zip(t_pieces, s_slots, strict=True)):
        pair = ModuleDistillation(meta_hybrid(meta_pieces, i, slot), t, kd, alpha)
        phases.append(trainer.run(f"student module {i} (m2mKD)", pair.student, settings, module_epochs, objective=pair))
    # the stitch layers stay behind, as in the reference code's default
    return _assembled(s_pieces, meta, phases, trainer, settings, finetune_epochs, "assembled student (E2E)")


def plain_kd(teacher: StackModel, student: StackModel, alpha: float, temperature: float) -> ModuleDistillation:
    """Logit KD of a whole student from a whole teacher: the one-module case of m2mKD's objective
    (no meta model around the pair). Trains ``student`` in place; the teacher is copied and frozen."""
    return ModuleDistillation(
        MetaHybrid(Piece([]), _whole(student), Piece([])), _whole(copy.deepcopy(teacher)), logit_kd(temperature), alpha
    )


def _whole(model: StackModel) -> Piece:
    """``model`` as one piece sharing its modules."""
    return Piece(list(model.body.layers), stem=model.stem, head=model.head)
