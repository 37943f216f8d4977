"""The training recipe: a readable loop built from plain step functions."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from brickwork.data.base import Split
from brickwork.data.batching import batches, epoch_order, num_batches
from brickwork.distributed.batch import all_sum, all_sum_start, shard_batch
from brickwork.distributed.data_parallel import context_of, count_rows, finish_gradients, gathered
from brickwork.errors import BrickworkError
from brickwork.nn.hooks import after_optimizer_epoch, after_optimizer_step, reset_regrown_state
from brickwork.nn.records import aux_weight, collect_aux_losses
from brickwork.train.checkpoint import load_training_state, save_training_state
from brickwork.train.losses import LossFn
from brickwork.train.optim import Schedule, lr_factor

#: What a step with a non-finite loss does: ``stop`` the training (the default: a diverged run is
#: a failed run), or ``skip_batch`` (no update from that batch; training goes on).
NonFinitePolicy = Literal["stop", "skip_batch"]


class NonFiniteLossError(BrickworkError):
    """Training produced a non-finite loss or non-finite weights; the run has diverged."""


@dataclass
class StepResult:
    """Scalars from one optimisation step (floats, so logging never holds the graph).

    ``skipped`` is true when the step's loss was not finite: no gradient was applied.
    """

    loss: float
    aux: dict[str, float] = field(default_factory=dict)
    skipped: bool = False


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
    them (``nn.records``) and added with ``aux_weights[name]`` (default: the loss's paper weight,
    ``nn.records.AUX_LOSS_DEFAULTS``; 1.0 for a loss none is listed for). A model with a
    ``training_loss(x, y, loss_fn)`` method supplies its own objective (``nn.hooks``). After
    the update, bricks' ``after_step`` / ``set_progress(progress)`` hooks run, and the
    optimizer's state is zeroed where sparse layers regrew weights.

    A non-finite objective (NaN or inf) is checked before the backward pass: nothing is
    updated and the result says ``skipped``, so the caller decides (stop or go on) with the
    weights still as they were before the bad batch.

    A data-parallel model (``distributed.DataParallel``) gets the global batch here: each rank
    takes its slice and weights its loss so that the step equals the full-batch step
    (``distributed.batch``); the reported loss, auxiliary losses and the skip decision are those
    of the whole batch, the same on every rank. (Auxiliary losses are computed per rank, on the
    rank's slice: a batch statistic such as a load-balancing loss is then not the full batch's.)
    """
    dist = context_of(model)
    x, y, share = shard_batch(dist, x, y)
    count_rows(model, share != 0.0)  # a borrowed row stays out of expert parallelism's batch statistics
    if share != 1.0:  # scaled where every loss is made: a model may backpropagate inside its objective
        task_loss = loss_fn
        loss_fn = lambda logits, target: share * task_loss(logits, target)  # noqa: E731
    optimizer.zero_grad(set_to_none=True)
    objective = getattr(model, "training_loss", None)
    loss = objective(x, y, loss_fn) if callable(objective) else loss_fn(model(x), y)
    total = loss
    aux = collect_aux_losses(model)
    if aux:
        total = loss + share * sum(aux_weight(k, aux_weights) * v for k, v in aux.items())
    values = [loss.item(), *(share * v.item() for v in aux.values())]  # each times this rank's share
    finite = math.isfinite(total.item())
    if dist.active:
        # One all-reduce, overlapped with the backward pass: the whole batch's scalars and one
        # skip decision for all ranks. A non-finite step is then skipped after its backward, but
        # before any update: the weights stay as they were, as in one process.
        sums = all_sum_start(dist, [*values, 0.0 if finite else 1.0])
        total.backward()
        *summed, bad = sums()
        values, finite = [v / dist.world_size for v in summed], bad == 0
    scalars = StepResult(values[0], dict(zip(aux, values[1:], strict=True)))
    if not finite:
        scalars.skipped = True
        return scalars
    if not dist.active:
        total.backward()
    finish_gradients(model, grad_clip)  # expert parallelism reduces its experts here; clipping
    optimizer.step()
    after_optimizer_step(model, progress)
    reset_regrown_state(model, optimizer)
    return scalars


@torch.no_grad()
def evaluate(
    model: nn.Module, split: Split, loss_fn: LossFn, batch_size: int = 512, device: str = "cpu"
) -> dict[str, float]:
    """Mean loss and accuracy of ``model`` on ``split`` (accuracy per token for language models).

    A data-parallel model evaluates each batch's rows spread over the ranks, and the sums are
    reduced: every rank returns the whole split's figures.
    """
    dist = context_of(model)
    was_training = model.training
    model.eval()
    loss_sum, correct, count, n = 0.0, 0.0, 0.0, 0.0
    for xb, yb in batches(split.x, split.y, batch_size):
        x, y, share = shard_batch(dist, xb.to(device), yb.to(device))
        logits = model(x)
        used = 1.0 if share else 0.0  # a borrowed row (empty slice) counts nothing
        loss_sum += used * loss_fn(logits, y).item() * len(x)
        correct += used * (logits.argmax(-1) == y).sum().item()
        count += used * y.numel()
        n += used * len(x)
    model.train(was_training)
    loss_sum, correct, count, n = all_sum(dist, [loss_sum, correct, count, n])
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
    nonfinite: NonFinitePolicy = "stop"


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
    """Train over ``data`` once.

    Returns:
        The mean task loss and mean auxiliary losses over the batches that were applied; a
        batch skipped for a non-finite loss (``cfg.nonfinite == "skip_batch"``) reaches
        ``on_step`` with ``skipped`` set and counts in neither.

    Raises:
        _NonFiniteStep: a step's loss was not finite and the policy is ``stop``.
    """
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
        if r.skipped:
            if cfg.nonfinite == "stop":
                raise _NonFiniteStep(i + 1, r.loss)
            if on_step is not None:
                on_step(r)
            continue
        loss_sum += r.loss
        for k, v in r.aux.items():
            aux_sum[k] = aux_sum.get(k, 0.0) + v
        n += 1
        if on_step is not None:
            on_step(r)
    after_optimizer_epoch(model, optimizer)  # SET's end-of-epoch rewiring (nn.hooks)
    return loss_sum / max(n, 1), {k: v / max(n, 1) for k, v in aux_sum.items()}


class _NonFiniteStep(Exception):
    """Raised by :func:`run_epoch` at a non-finite step; :func:`fit` adds where it happened."""

    def __init__(self, step: int, loss: float) -> None:
        super().__init__(step, loss)
        self.step, self.loss = step, loss


def _diverged(desc: str, what: str, policy: NonFinitePolicy) -> NonFiniteLossError:
    skip = "" if policy == "skip_batch" else ", or set nonfinite: skip_batch on the stage to skip such batches"
    return NonFiniteLossError(f"{desc}: {what}; training has diverged (lower lr, set grad_clip{skip})")


def _nonfinite_weight(model: nn.Module) -> str | None:
    """Name of the first parameter with a NaN or inf entry, or None."""
    return next((name for name, p in model.named_parameters() if not torch.isfinite(p).all()), None)


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
        ``val_accuracy``, ``seconds`` and mean auxiliary losses ``aux.<name>``; with
        ``cfg.nonfinite == "skip_batch"`` also ``skipped_batches``).

    Raises:
        NonFiniteLossError: a training loss was NaN or inf (policy ``stop``: before its update,
            so the last saved state is intact); every batch of an epoch was skipped; or the
            weights or the validation loss became non-finite. A diverged run never completes.
    """
    history: list[dict[str, Any]] = []
    start_epoch = 0
    if state_path is not None and state_path.with_suffix(".json").exists():
        # bound to the seed: another seed's state copied into this folder is refused
        done = load_training_state(state_path, model, optimizer, expect={"seed": cfg.seed})
        start_epoch, history = done["epoch"], done["history"]
    steps_per_epoch = num_batches(len(train), cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(
        total=total,
        initial=start_epoch * steps_per_epoch,
        desc=desc,
        disable=not show or not context_of(model).is_main,
        leave=False,
        unit="step",
        dynamic_ncols=True,
    )
    skips: list[StepResult] = []  # this epoch's steps skipped for a non-finite loss

    def on_step(r: StepResult) -> None:
        if r.skipped:
            skips.append(r)
        show_step(bar, r)

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        order = epoch_order(len(train), cfg.seed, epoch)
        where = f"epoch {epoch + 1} of {cfg.epochs}"
        skips.clear()
        try:
            train_loss, aux = run_epoch(
                model,
                batches(train.x, train.y, cfg.batch_size, order=order),
                loss_fn,
                optimizer,
                cfg,
                step0=epoch * steps_per_epoch,
                total_steps=total,
                on_step=on_step,
            )
        except _NonFiniteStep as e:
            bar.close()
            raise _diverged(
                desc,
                f"non-finite training loss ({e.loss}) at {where}, step {e.step} of {steps_per_epoch}",
                cfg.nonfinite,
            ) from None
        seconds = time.perf_counter() - t0
        problem = None
        if len(skips) == steps_per_epoch:
            problem = f"every batch of {where} had a non-finite loss ({len(skips)} skipped)"
        elif (name := _nonfinite_weight(gathered(model))) is not None:
            problem = f"non-finite weights in {name} after {where}"
        val_metrics = evaluate(model, val, loss_fn, device=cfg.device) if len(val) and problem is None else {}
        if problem is None and not math.isfinite(val_metrics.get("loss", 0.0)):
            problem = f"non-finite validation loss ({val_metrics['loss']}) after {where}"
        if problem is not None:
            bar.close()
            raise _diverged(desc, problem, cfg.nonfinite)
        row = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "seconds": seconds,
            **{f"val_{k}": v for k, v in val_metrics.items()},
            **{f"aux.{k}": v for k, v in aux.items()},
            **({"skipped_batches": len(skips)} if cfg.nonfinite == "skip_batch" else {}),
        }
        history.append(row)
        if state_path is not None:
            saved = {"epoch": epoch + 1, "history": history}
            save_training_state(state_path, model, optimizer, saved, bind={"seed": cfg.seed})
    bar.close()
    return history
