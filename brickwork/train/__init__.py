"""Training: a readable loop, its step functions, losses, optimizers and checkpoints."""

from brickwork.train.checkpoint import load_model, load_training_state, save_model, save_training_state
from brickwork.data.batching import batches, epoch_order
from brickwork.train.loop import FitConfig, StepResult, evaluate, fit, run_epoch, train_step
from brickwork.train.losses import build_loss, cross_entropy
from brickwork.train.optim import build_optimizer, lr_factor

__all__ = [
    "FitConfig",
    "StepResult",
    "batches",
    "build_loss",
    "build_optimizer",
    "cross_entropy",
    "epoch_order",
    "evaluate",
    "fit",
    "load_model",
    "load_training_state",
    "lr_factor",
    "run_epoch",
    "save_model",
    "save_training_state",
    "train_step",
]
