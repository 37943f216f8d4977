"""The training recipe: a readable loop built from plain step functions."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from brickwork.data.base import Split
from brickwork.data.batching import batches, epoch_order, num_batches
from brickwork.nn.hooks import after_optimizer_step, reset_regrown_state
from brickwork.nn.records import collect_aux_losses
from brickwork.train.checkpoint import load_training_state, save_training_state
from brickwork.train.losses import LossFn
from brickwork.train.optim import Schedule, lr_factor


@dataclass
class StepResult:
    """Scalars from one optimisation step (floats, so logging never holds the graph)."""

    loss: float
    aux: dict[str, float] = field(default_factory=dict)


def train_step(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    aux_weights: dict[str, float] | None = None,
    grad_clip: float | None = None,
    progress: float | None = None,
) -> StepResult:
    """One step: forward, task loss plus the bricks' weighted auxiliary losses, backward, update.

    Auxiliary losses (load balancing, z-loss, ...) are collected from every brick that left
    them (``nn.records``) and added with ``aux_weights[name]`` (default 1.0). A model with a
    ``training_loss(x, y, loss_fn)`` method supplies its own objective (``nn.hooks``). After
    the update, bricks' ``after_step`` / ``set_progress(progress)`` hooks run, and the
    optimizer's state is zeroed where sparse layers regrew weights.
    """
    optimizer.zero_grad(set_to_none=True)
    objective = getattr(model, "training_loss", None)
    loss = objective(x, y, loss_fn) if callable(objective) else loss_fn(model(x), y)
    total = loss
    aux = collect_aux_losses(model)
    if aux:
        weights = aux_weights or {}
        total = loss + sum(weights.get(k, 1.0) * v for k, v in aux.items())
    total.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    after_optimizer_step(model, progress)
    reset_regrown_state(model, optimizer)
    return StepResult(loss.item(), {k: v.item() for k, v in aux.items()})


@torch.no_grad()
def evaluate(
    model: nn.Module, split: Split, loss_fn: LossFn, batch_size: int = 512, device: str = "cpu"
) -> dict[str, float]:
    """Mean loss and accuracy of ``model`` on ``split`` (accuracy per token for language models)."""
    was_training = model.training
    model.eval()
    loss_sum, correct, count, n = 0.0, 0, 0, 0
    for x, y in batches(split.x, split.y, batch_size):
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss_sum += loss_fn(logits, y).item() * len(x)
        correct += (logits.argmax(-1) == y).sum().item()
        count += y.numel()
        n += len(x)
    model.train(was_training)
    return {"loss": loss_sum / n, "accuracy": correct / count}


@dataclass
class FitConfig:
    """How :func:`fit` trains; the ``train`` stage's arguments map onto it one to one."""

    epochs: int
    batch_size: int
    seed: int
    schedule: Schedule = "cosine"
    warmup_steps: int = 0
    aux_weights: dict[str, float] = field(default_factory=dict)
    grad_clip: float | None = None
    device: str = "cpu"


def show_step(bar: Any, result: StepResult) -> None:
    """Advance a tqdm progress bar by one step and show the step's loss (no forced refresh)."""
    bar.update()
    bar.set_postfix(loss=f"{result.loss:.3f}", refresh=False)


def run_epoch(
    model: nn.Module,
    data: Iterable[tuple[Tensor, Tensor]],
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    cfg: FitConfig,
    *,
    step0: int,
    total_steps: int,
    on_step: Callable[[StepResult], None] | None = None,
) -> tuple[float, dict[str, float]]:
    """Train over ``data`` once; returns the mean task loss and mean auxiliary losses."""
    model.train()
    base_lrs = [g.setdefault("initial_lr", g["lr"]) for g in optimizer.param_groups]
    loss_sum, n = 0.0, 0
    aux_sum: dict[str, float] = {}
    for i, (x, y) in enumerate(data):
        factor = lr_factor(cfg.schedule, step0 + i, total_steps, cfg.warmup_steps)
        for g, lr in zip(optimizer.param_groups, base_lrs, strict=True):
            g["lr"] = lr * factor
        r = train_step(
            model,
            x.to(cfg.device),
            y.to(cfg.device),
            loss_fn,
            optimizer,
            cfg.aux_weights,
            cfg.grad_clip,
            progress=(step0 + i + 1) / total_steps,
        )
        loss_sum += r.loss
        for k, v in r.aux.items():
            aux_sum[k] = aux_sum.get(k, 0.0) + v
        n += 1
        if on_step is not None:
            on_step(r)
    return loss_sum / max(n, 1), {k: v / max(n, 1) for k, v in aux_sum.items()}


def fit(
    model: nn.Module,
    train: Split,
    val: Split,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    cfg: FitConfig,
    *,
    state_path: Path | None = None,
    progress: bool | None = None,
    desc: str = "train",
) -> list[dict[str, Any]]:
    """Train for ``cfg.epochs`` epochs, evaluating on ``val`` after each one.

    With ``state_path``, the full training state is saved after every epoch, and if a state
    is already there training continues from it (resume), reproducing the uninterrupted run.

    Returns:
        The history: one dict per epoch (``epoch``, ``train_loss``, ``val_loss``,
        ``val_accuracy``, ``seconds`` and mean auxiliary losses ``aux.<name>``).
    """
    history: list[dict[str, Any]] = []
    start_epoch = 0
    if state_path is not None and state_path.with_suffix(".json").exists():
        done = load_training_state(state_path, model, optimizer)
        start_epoch, history = done["epoch"], done["history"]
    steps_per_epoch = num_batches(len(train), cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(
        total=total,
        initial=start_epoch * steps_per_epoch,
        desc=desc,
        disable=not show,
        leave=False,
        unit="step",
        dynamic_ncols=True,
    )
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        order = epoch_order(len(train), cfg.seed, epoch)
        train_loss, aux = run_epoch(
            model,
            batches(train.x, train.y, cfg.batch_size, order=order),
            loss_fn,
            optimizer,
            cfg,
            step0=epoch * steps_per_epoch,
            total_steps=total,
            on_step=lambda r: show_step(bar, r),
        )
        seconds = time.perf_counter() - t0
        val_metrics = evaluate(model, val, loss_fn, device=cfg.device) if len(val) else {}
        row = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "seconds": seconds,
            **{f"val_{k}": v for k, v in val_metrics.items()},
            **{f"aux.{k}": v for k, v in aux.items()},
        }
        history.append(row)
        if state_path is not None:
            save_training_state(state_path, model, optimizer, {"epoch": epoch + 1, "history": history})
    bar.close()
    return history
