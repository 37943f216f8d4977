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
from brickwork.distributed.batch import all_sum, shard_batch
from brickwork.distributed.data_parallel import context_of, count_rows, finish_gradients, gathered, step_sums_start
from brickwork.errors import BrickworkError
from brickwork.nn.hooks import ModelHooks, after_optimizer_epoch
from brickwork.nn.records import aux_loss_holders, aux_weight, collect_aux_losses
from brickwork.train.checkpoint import load_training_state, save_training_state
from brickwork.train.losses import LossFn
from brickwork.train.optim import Schedule, lr_factor
from brickwork.train.tensorboard import open_writer, routing_scalars

#: What a step with a non-finite loss does: ``stop`` the training (the default: a diverged run is
#: a failed run), or ``skip_batch`` (no update from that batch; training goes on).
NonFinitePolicy = Literal["stop", "skip_batch"]


class NonFiniteLossError(BrickworkError):
    """Training produced a non-finite loss or non-finite weights; the run has diverged."""


@dataclass
class StepResult:
    """Scalars from one optimisation step, detached (logging never holds the graph).

    ``loss_value`` and ``aux_values`` are where the step left them: 0-dim tensors on the model's
    device (a single process), or floats (after a data-parallel all-reduce). Reading a device
    tensor is a host synchronisation on an accelerator, so :func:`run_epoch` sums them where
    they are and reads the sums once per epoch; :attr:`loss` and :attr:`aux` read them now.
    ``skipped`` is true when the step's loss was not finite: no gradient was applied.
    """

    loss_value: Tensor | float
    aux_values: dict[str, Tensor | float] = field(default_factory=dict)
    skipped: bool = False

    @property
    def loss(self) -> float:
        """The task loss (a host read)."""
        return float(self.loss_value)

    @property
    def aux(self) -> dict[str, float]:
        """Each auxiliary loss, unweighted (host reads)."""
        return {k: float(v) for k, v in self.aux_values.items()}


class StepPlan:
    """What :func:`train_step` finds once per epoch instead of once per step (issue 16).

    The model's hooks (:class:`~brickwork.nn.hooks.ModelHooks`), the modules that leave
    auxiliary losses (found after the first forward, where a brick may create them), the
    ``training_loss`` objective, and each auxiliary loss's weight.
    """

    __slots__ = ("hooks", "holders", "objective", "weights")

    def __init__(self, model: nn.Module, aux_weights: dict[str, float] | None) -> None:
        self.hooks = ModelHooks(model)
        self.holders: tuple[nn.Module, ...] | None = None
        objective = getattr(model, "training_loss", None)
        self.objective: Callable[..., Tensor] | None = objective if callable(objective) else None
        self.weights = _AuxWeights(aux_weights)


class _AuxWeights(dict[str, float]):
    """``aux_weight(name, weights)`` per name, looked up once."""

    def __init__(self, weights: dict[str, float] | None) -> None:
        super().__init__()
        self.given = weights

    def __missing__(self, name: str) -> float:
        self[name] = w = aux_weight(name, self.given)
        return w


def train_step(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    aux_weights: dict[str, float] | None = None,
    grad_clip: float | None = None,
    progress: float | None = None,
    *,
    plan: StepPlan | None = None,
) -> StepResult:
    """One step: forward, task loss plus the bricks' weighted auxiliary losses, backward, update.

    Auxiliary losses (load balancing, z-loss, ...) are collected from every brick that left
    them (``nn.records``) and added with ``aux_weights[name]`` (default: the loss's paper weight,
    ``nn.records.AUX_LOSS_DEFAULTS``; 1.0 for a loss none is listed for). A model with a
    ``training_loss(x, y, loss_fn)`` method supplies its own objective (``nn.hooks``). After
    the update, bricks' ``after_step`` / ``set_progress(progress)`` hooks run, and the
    optimizer's state is zeroed where sparse layers regrew weights. ``plan`` (a
    :class:`StepPlan` of this model, kept across steps) spares finding hooks and weights again;
    the step is the same with or without it.

    A non-finite objective (NaN or inf) is checked before the backward pass: nothing is
    updated and the result says ``skipped``, so the caller decides (stop or go on) with the
    weights still as they were before the bad batch. That check is the step's one host read
    (a single process): the metrics stay on the device, in the result.

    A data-parallel model (``distributed.DataParallel``) gets the global batch here: each rank
    takes its slice and weights its loss so that the step equals the full-batch step
    (``distributed.batch``); the reported loss, auxiliary losses and the skip decision are those
    of the whole batch, the same on every rank. (Auxiliary losses are computed per rank, on the
    rank's slice: a batch statistic such as a load-balancing loss is then not the full batch's.)
    """
    if plan is None:
        plan = StepPlan(model, aux_weights)
    dist = context_of(model)
    x, y, share = shard_batch(dist, x, y)
    count_rows(model, share != 0.0)  # a borrowed row stays out of expert parallelism's batch statistics
    if share != 1.0:  # scaled where every loss is made: a model may backpropagate inside its objective
        task_loss = loss_fn
        loss_fn = lambda logits, target: share * task_loss(logits, target)  # noqa: E731
    optimizer.zero_grad(set_to_none=True)
    loss = plan.objective(x, y, loss_fn) if plan.objective is not None else loss_fn(model(x), y)
    total = loss
    if plan.holders is None:
        plan.holders = aux_loss_holders(model)
    aux = collect_aux_losses(model, plan.holders) if plan.holders else {}
    if aux:
        # the same sum, term by term, as before the plan (bit-identical weights and metrics)
        total = loss + share * sum(plan.weights[k] * v for k, v in aux.items())
    if dist.active:
        values = [loss.item(), *(share * v.item() for v in aux.values())]  # each times this rank's share
        finite = math.isfinite(total.item())
        # The whole batch's scalars and one skip decision for all ranks, summed during the backward
        # (under DDP inside its last gradient bucket: one all-reduce per step). A non-finite step is
        # then skipped after its backward, but before any update: the weights stay as they were.
        sums = step_sums_start(model, [*values, 0.0 if finite else 1.0])
        total.backward()
        *summed, bad = sums()
        summed = [v / dist.world_size for v in summed]
        scalars = StepResult(summed[0], dict(zip(aux, summed[1:], strict=True)), skipped=bad != 0)
    else:
        # The one host read of the step: the contract is that a non-finite loss stops (or skips)
        # before the update. On the CPU it costs Python overhead only (ops are synchronous);
        # on an accelerator it waits for the forward, the price of never applying a NaN step.
        finite = math.isfinite(total.item())
        scalars = StepResult(loss.detach(), {k: v.detach() for k, v in aux.items()}, skipped=not finite)
    if scalars.skipped:
        return scalars
    if not dist.active:
        total.backward()
    finish_gradients(model, grad_clip)  # expert parallelism reduces its experts here; clipping
    optimizer.step()
    plan.hooks.after_optimizer_step(progress)
    if plan.hooks.take_regrown:
        plan.hooks.reset_regrown_state(optimizer)
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
    """Advance a tqdm progress bar by one step; show the step's loss when the bar is redrawn.

    The loss is read (a host synchronisation on an accelerator) only when tqdm is about to
    redraw (at most every ``bar.mininterval`` seconds, 0.1 s by default), not at every step.
    """
    if not bar.disable and time.time() - bar.last_print_t >= bar.mininterval:
        bar.set_postfix(loss=f"{result.loss:.3f}", refresh=False)
    bar.update()


#: ``on_log(step, scalars)``: training scalars of the steps since the last call (:func:`run_epoch`).
LogFn = Callable[[int, dict[str, float]], None]


class _Sums:
    """Device-side sums of the applied steps' task and auxiliary losses.

    float64, added in step order: the same numbers as summing the steps' values as Python floats
    (a float32 loss is widened exactly, then added in double), without a host read per step.
    """

    __slots__ = ("aux", "loss", "n")

    def __init__(self) -> None:
        self.loss: Tensor | None = None
        self.aux: dict[str, Tensor] = {}
        self.n = 0

    def add(self, r: StepResult) -> None:
        if self.loss is None:
            self.loss = _zero(r.loss_value)
        self.loss.add_(r.loss_value)
        for k, v in r.aux_values.items():
            acc = self.aux.get(k)
            if acc is None:
                acc = self.aux[k] = _zero(v)
            acc.add_(v)
        self.n += 1

    def read(self) -> tuple[float, dict[str, float]]:
        """The sums, read in one host transfer: (task loss, {aux name: sum})."""
        if self.loss is None:
            return 0.0, {}
        values = torch.stack([self.loss, *(v.to(self.loss.device) for v in self.aux.values())]).tolist()
        return values[0], dict(zip(self.aux, values[1:], strict=True))


def _zero(like: Tensor | float) -> Tensor:
    device = like.device if isinstance(like, Tensor) else None
    return torch.zeros((), dtype=torch.float64, device=device)


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
    on_log: LogFn | None = None,
    log_every: int = 10,
) -> tuple[float, dict[str, float]]:
    """Train over ``data`` once.

    The steps' losses are summed on the device and read once at the end (and, with ``on_log``,
    every ``log_every`` steps): no host read per step beyond the step's own finiteness check.
    ``on_log(step, scalars)`` gets, at every ``log_every``-th global step and at the epoch's
    last, the mean task loss ``loss`` and auxiliary losses ``aux.<name>`` of the steps applied
    since its last call, and the learning rate ``lr`` (of the first parameter group); ``step``
    counts optimizer steps from 1 over the whole fit.

    Returns:
        The mean task loss and mean auxiliary losses over the batches that were applied; a
        batch skipped for a non-finite loss (``cfg.nonfinite == "skip_batch"``) reaches
        ``on_step`` with ``skipped`` set and counts in neither.

    Raises:
        _NonFiniteStep: a step's loss was not finite and the policy is ``stop``.
    """
    model.train()
    groups = optimizer.param_groups
    base_lrs = [g.setdefault("initial_lr", g["lr"]) for g in groups]
    plan = StepPlan(model, cfg.aux_weights)
    sums = _Sums()
    logged: tuple[int, float, dict[str, float]] = (0, 0.0, {})  # applied steps, sums at the last log
    i = -1
    for i, (x, y) in enumerate(data):
        factor = lr_factor(cfg.schedule, step0 + i, total_steps, cfg.warmup_steps)
        for g, lr in zip(groups, base_lrs, strict=True):
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
            plan=plan,
        )
        if r.skipped:
            if cfg.nonfinite == "stop":
                raise _NonFiniteStep(i + 1, r.loss)
        else:
            sums.add(r)
        if on_step is not None:
            on_step(r)
        if on_log is not None and (step0 + i + 1) % log_every == 0:
            logged = _log_window(on_log, step0 + i + 1, float(groups[0]["lr"]), sums, logged)
    if on_log is not None and i >= 0 and (step0 + i + 1) % log_every != 0:
        logged = _log_window(on_log, step0 + i + 1, float(groups[0]["lr"]), sums, logged)
    after_optimizer_epoch(model, optimizer)  # SET's end-of-epoch rewiring (nn.hooks)
    loss_sum, aux_sum = sums.read()
    n = max(sums.n, 1)
    return loss_sum / n, {k: v / n for k, v in aux_sum.items()}


def _log_window(
    on_log: LogFn, step: int, lr: float, sums: _Sums, last: tuple[int, float, dict[str, float]]
) -> tuple[int, float, dict[str, float]]:
    """Call ``on_log`` with the means since ``last`` (one host read); return the new ``last``."""
    n0, loss0, aux0 = last
    loss, aux = sums.read()
    scalars = {"lr": lr}
    if (k := sums.n - n0) > 0:
        scalars["loss"] = (loss - loss0) / k
        scalars.update({f"aux.{name}": (v - aux0.get(name, 0.0)) / k for name, v in aux.items()})
    on_log(step, scalars)
    return sums.n, loss, aux


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
    log_dir: Path | None = None,
    log_every: int = 10,
) -> list[dict[str, Any]]:
    """Train for ``cfg.epochs`` epochs, evaluating on ``val`` after each one.

    With ``state_path``, the full training state is saved after every epoch, and if a state
    is already there training continues from it (resume), reproducing the uninterrupted run.

    With ``log_dir`` (and the ``tensorboard`` extra; rank 0 only), TensorBoard scalars are
    written there (``train.tensorboard``): ``train/loss``, ``train/lr`` and ``train/aux.<name>``
    every ``log_every`` steps (means over those steps), and at each epoch's last step
    ``train/epoch_loss``, ``val/loss``, ``val/accuracy`` and the routing statistics of the
    epoch's last training batch (``routing/<layer>/imbalance``, ``.../dropped_fraction``,
    ``.../entropy``). A resumed fit purges what the interrupted one wrote after its last saved
    epoch. Logging reads the device every ``log_every`` steps, never per step.

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
    writer = open_writer(log_dir, purge_step=start_epoch * steps_per_epoch + 1) if start_epoch < cfg.epochs else None
    skips: list[StepResult] = []  # this epoch's steps skipped for a non-finite loss

    def on_step(r: StepResult) -> None:
        if r.skipped:
            skips.append(r)
        show_step(bar, r)

    def on_log(step: int, scalars: dict[str, float]) -> None:
        assert writer is not None
        writer.scalars(step, scalars, "train")

    try:
        for epoch in range(start_epoch, cfg.epochs):
            row = _fit_epoch(
                model,
                train,
                val,
                loss_fn,
                optimizer,
                cfg,
                epoch,
                steps_per_epoch,
                desc,
                skips,
                on_step,
                on_log if writer is not None else None,
                log_every,
            )
            if writer is not None:
                step = (epoch + 1) * steps_per_epoch
                writer.scalars(step, {"epoch_loss": row["train_loss"]}, "train")
                writer.scalars(step, {k[4:]: v for k, v in row.items() if k.startswith("val_")}, "val")
                writer.scalars(step, row.pop("_routing"), "routing")
            row.pop("_routing", None)
            history.append(row)
            if state_path is not None:
                saved = {"epoch": epoch + 1, "history": history}
                save_training_state(state_path, model, optimizer, saved, bind={"seed": cfg.seed})
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    return history


def _fit_epoch(
    model: nn.Module,
    train: Split,
    val: Split,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    cfg: FitConfig,
    epoch: int,
    steps_per_epoch: int,
    desc: str,
    skips: list[StepResult],
    on_step: Callable[[StepResult], None],
    on_log: LogFn | None,
    log_every: int,
) -> dict[str, Any]:
    """One epoch of :func:`fit`: train, check for divergence, validate; the history row.

    With ``on_log`` the row also holds ``_routing``: the routing statistics of the epoch's last
    training batch (read before validation overwrites the routed layers' records).
    """
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
            total_steps=cfg.epochs * steps_per_epoch,
            on_step=on_step,
            on_log=on_log,
            log_every=log_every,
        )
    except _NonFiniteStep as e:
        raise _diverged(
            desc,
            f"non-finite training loss ({e.loss}) at {where}, step {e.step} of {steps_per_epoch}",
            cfg.nonfinite,
        ) from None
    seconds = time.perf_counter() - t0
    routing = routing_scalars(model) if on_log is not None else None
    problem = None
    if len(skips) == steps_per_epoch:
        problem = f"every batch of {where} had a non-finite loss ({len(skips)} skipped)"
    elif (name := _nonfinite_weight(gathered(model))) is not None:
        problem = f"non-finite weights in {name} after {where}"
    val_metrics = evaluate(model, val, loss_fn, device=cfg.device) if len(val) and problem is None else {}
    if problem is None and not math.isfinite(val_metrics.get("loss", 0.0)):
        problem = f"non-finite validation loss ({val_metrics['loss']}) after {where}"
    if problem is not None:
        raise _diverged(desc, problem, cfg.nonfinite)
    return {
        "epoch": epoch + 1,
        "train_loss": train_loss,
        "seconds": seconds,
        **{f"val_{k}": v for k, v in val_metrics.items()},
        **{f"aux.{k}": v for k, v in aux.items()},
        **({"skipped_batches": len(skips)} if cfg.nonfinite == "skip_batch" else {}),
        **({"_routing": routing} if routing is not None else {}),
    }
