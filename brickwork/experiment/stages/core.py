"""The stages a pipeline is made of: thin calls into ``train/``, ``ops/`` and ``analysis/``.

A stage is a registered function ``stage(ctx, /, **args)``; its keyword arguments are the
stage's config keys, validated from their annotations before the run starts.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import Field
from torch import nn

from brickwork.analysis.compute import measure_compute
from brickwork.analysis.timing import measure_latency
from brickwork.experiment.context import StageContext
from brickwork.registry import RegistryName, register
from brickwork.train import FitConfig, build_loss, build_optimizer, evaluate, fit
from brickwork.train.optim import Schedule


def train_model(
    ctx: StageContext,
    model: nn.Module,
    state_path: Path,
    desc: str,
    *,
    epochs: int,
    batch_size: int,
    optimizer: str = "adamw",
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    schedule: Schedule = "cosine",
    warmup_steps: int = 0,
    loss: str = "cross_entropy",
    label_smoothing: float = 0.0,
    grad_clip: float | None = None,
) -> list[dict[str, Any]]:
    """Train ``model`` on ``ctx``'s data as the ``train`` stage does, resumable from ``state_path``.

    Stages that train more than the variant's own model (separately trained baselines) call
    this with their own model and state path. Returns the per-epoch history.
    """
    opt = build_optimizer(optimizer, model.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = build_loss(loss, label_smoothing=label_smoothing)
    cfg = FitConfig(epochs=epochs, batch_size=batch_size, seed=ctx.seed, schedule=schedule,
                    warmup_steps=warmup_steps, aux_weights=ctx.aux_weights, grad_clip=grad_clip, device=ctx.device)
    return fit(model, ctx.data.train, ctx.data.val, loss_fn, opt, cfg, state_path=state_path,
               progress=ctx.progress, desc=desc)


@register("stage", "train")
def train(
    ctx: StageContext,
    /,
    epochs: Annotated[int, Field(ge=1)] = 10,
    batch_size: Annotated[int, Field(ge=1)] = 64,
    optimizer: Annotated[str, RegistryName("optimizer")] = "adamw",
    lr: Annotated[float, Field(gt=0)] = 1e-3,
    weight_decay: Annotated[float, Field(ge=0)] = 0.01,
    schedule: Schedule = "cosine",
    warmup_steps: Annotated[int, Field(ge=0)] = 0,
    loss: Annotated[str, RegistryName("loss")] = "cross_entropy",
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.0,
    grad_clip: Annotated[float, Field(gt=0)] | None = None,
) -> None:
    """Train the model on the train split, validating after every epoch; resumable."""
    torch.manual_seed(ctx.seed)
    t0 = time.perf_counter()
    history = train_model(ctx, ctx.model, ctx.stage_path("train_state"), f"train {ctx.label}", epochs=epochs,
                          batch_size=batch_size, optimizer=optimizer, lr=lr, weight_decay=weight_decay,
                          schedule=schedule, warmup_steps=warmup_steps, loss=loss,
                          label_smoothing=label_smoothing, grad_clip=grad_clip)
    ctx.history.extend(history)
    # Time of this process plus what earlier (interrupted) processes spent on the same stage.
    ctx.metrics["train_seconds"] = sum(row["seconds"] for row in history)
    ctx.metrics["train_wall_seconds_this_process"] = time.perf_counter() - t0
    if history and "val_accuracy" in history[-1]:
        ctx.metrics["val_accuracy"] = history[-1]["val_accuracy"]


@register("stage", "evaluate")
def evaluate_stage(
    ctx: StageContext,
    /,
    split: Annotated[str, Field(pattern="^(val|test)$")] = "test",
    batch_size: Annotated[int, Field(ge=1)] = 256,
    flops_samples: Annotated[int, Field(ge=1)] = 1024,
    latency_repeats: Annotated[int, Field(ge=1)] = 5,
) -> None:
    """Accuracy and loss on a held-out split, parameters, FLOPs executed per sample, latency."""
    data = getattr(ctx.data, split)
    model = ctx.model
    metrics = evaluate(model, data, build_loss("cross_entropy"), batch_size, device=ctx.device)
    xs = (data.x[i : i + batch_size].to(ctx.device) for i in range(0, len(data), batch_size))
    compute = measure_compute(model, xs, max_samples=flops_samples)
    latency = measure_latency(model, data.x[:batch_size].to(ctx.device), repeats=latency_repeats)
    ctx.metrics.update({
        f"{split}_accuracy": metrics["accuracy"],
        f"{split}_loss": metrics["loss"],
        "params": compute.params,
        "flops_per_sample": compute.flops_per_sample,
        "latency_us_per_sample": latency * 1e6,
    })
    if ctx.data.task == "lm":  # cross-entropy in nats per token -> bits per character
        ctx.metrics[f"{split}_bits_per_char"] = metrics["loss"] / math.log(2)
    ctx.points.append({"label": ctx.label, "accuracy": metrics["accuracy"], "flops": compute.flops_per_sample,
                       "params": compute.params, "latency_us": latency * 1e6, "split": split})
