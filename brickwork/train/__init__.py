"""Training: a readable loop, its step functions, losses, optimizers and checkpoints.

Batches come from :mod:`brickwork.data.batching` (``batches``, ``epoch_order``): the order of an
epoch is a pure function of (seed, epoch), so a resumed run needs no sampler state.
"""

from brickwork.train.assemble import (
    Assembled,
    Phase,
    Trainer,
    deep_model_assembling,
    logit_kd,
    module_to_module_kd,
    plain_kd,
    pretrain_meta,
)
from brickwork.train.budget import epochs_for_budget, flops_per_sample, step_flops, train_counted
from brickwork.train.checkpoint import load_model, load_training_state, save_model, save_training_state
from brickwork.train.finetune import finetune_classifier
from brickwork.train.layerwise import PhaseResult, train_phase
from brickwork.train.loop import FitConfig, StepResult, evaluate, fit, run_epoch, train_step
from brickwork.train.losses import build_loss, cross_entropy
from brickwork.train.optim import build_optimizer, lr_factor
from brickwork.train.recipe import DEFAULT_TRAINING, TrainSettings, train_with
from brickwork.train.sema import ContinualResult, class_tasks, continual, sema_like, sema_model

__all__ = [
    "Assembled",
    "Phase",
    "Trainer",
    "deep_model_assembling",
    "logit_kd",
    "module_to_module_kd",
    "plain_kd",
    "pretrain_meta",
    "epochs_for_budget",
    "flops_per_sample",
    "train_counted",
    "ContinualResult",
    "DEFAULT_TRAINING",
    "FitConfig",
    "PhaseResult",
    "StepResult",
    "TrainSettings",
    "build_loss",
    "build_optimizer",
    "class_tasks",
    "continual",
    "cross_entropy",
    "evaluate",
    "finetune_classifier",
    "fit",
    "load_model",
    "load_training_state",
    "lr_factor",
    "run_epoch",
    "save_model",
    "save_training_state",
    "sema_like",
    "sema_model",
    "step_flops",
    "train_phase",
    "train_step",
    "train_with",
]
