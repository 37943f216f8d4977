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
from brickwork.data.batching import input_batches
from brickwork.experiment.context import SplitName, StageContext
from brickwork.nn.records import aux_weights_used
from brickwork.registry import Flatten, register
from brickwork.train import build_loss, evaluate
from brickwork.train.recipe import DEFAULT_TRAINING, TrainSettings, train_with
from brickwork.train.tensorboard import write_scalars


def train_model(
    ctx: StageContext, model: nn.Module, state_path: Path, desc: str, settings: TrainSettings
) -> list[dict[str, Any]]:
    """Train ``model`` on ``ctx``'s data as the ``train`` stage does, resumable from ``state_path``.

    Stages that train more than the variant's own model (separately trained baselines) call
    this with their own model and state path. Returns the per-epoch history.
    """
    return train_with(
        model,
        ctx.data.train,
        ctx.data.val,
        settings,
        seed=ctx.seed,
        aux_weights=ctx.aux_weights,
        device=ctx.device,
        state_path=state_path,
        progress=ctx.progress,
        desc=desc,
        log_dir=ctx.tensorboard_dir(state_path.name.removeprefix(f"stage{ctx.stage}-").removesuffix("_state")),
    )


@register("stage", "train")
def train(ctx: StageContext, /, settings: Annotated[TrainSettings, Flatten] = DEFAULT_TRAINING) -> None:
    """Train the model on the train split, validating after every epoch; resumable.

    Args:
        settings: the recipe (:class:`~brickwork.train.recipe.TrainSettings`: epochs,
            batch_size, optimizer, lr, weight_decay, schedule, warmup_steps, loss,
            label_smoothing, grad_clip; flat keys in a config).
    """
    torch.manual_seed(ctx.seed)
    t0 = time.perf_counter()
    history = train_model(ctx, ctx.model, ctx.stage_path("train_state"), f"train {ctx.label}", settings)
    ctx.history.extend(history)
    # Time of this process plus what earlier (interrupted) processes spent on the same stage.
    ctx.metrics["train_seconds"] = sum(row["seconds"] for row in history)
    ctx.metrics["train_wall_seconds_this_process"] = time.perf_counter() - t0
    if history and "val_accuracy" in history[-1]:
        ctx.metrics["val_accuracy"] = history[-1]["val_accuracy"]
    # The weights the auxiliary losses were trained with, and where each came from (issue 14).
    names = sorted({k.removeprefix("aux.") for row in history for k in row if k.startswith("aux.")})
    if names:
        used = aux_weights_used(names, ctx.aux_weights)
        ctx.metrics.update({f"aux_weight.{n}": w for n, (w, _) in used.items()})
        ctx.report.append(
            "Auxiliary losses, trained with weights: " + "; ".join(f"`{n}` {w:g} ({o})" for n, (w, o) in used.items())
        )


@register("stage", "evaluate")
def evaluate_stage(
    ctx: StageContext,
    /,
    split: SplitName = "test",
    batch_size: Annotated[int, Field(ge=1)] = 256,
    flops_samples: Annotated[int, Field(ge=1)] = 1024,
    latency_repeats: Annotated[int, Field(ge=1)] = 5,
) -> None:
    """Accuracy and loss on a held-out split, parameters, FLOPs executed per sample, latency."""
    data = getattr(ctx.data, split)
    model = ctx.model
    metrics = evaluate(model, data, build_loss("cross_entropy"), batch_size, device=ctx.device)
    compute = measure_compute(model, input_batches(data.x, batch_size, device=ctx.device), max_samples=flops_samples)
    latency = measure_latency(model, data.x[:batch_size].to(ctx.device), repeats=latency_repeats)
    ctx.metrics.update(
        {
            f"{split}_accuracy": metrics["accuracy"],
            f"{split}_loss": metrics["loss"],
            "params": compute.params,
            "flops_per_sample": compute.flops_per_sample,
            "latency_us_per_sample": latency * 1e6,
        }
    )
    if ctx.data.task == "lm":  # cross-entropy in nats per token -> bits per character
        ctx.metrics[f"{split}_bits_per_char"] = metrics["loss"] / math.log(2)
    write_scalars(
        ctx.tensorboard_dir("evaluate"),
        {
            "accuracy": metrics["accuracy"],
            "loss": metrics["loss"],
            "flops_per_sample": float(compute.flops_per_sample),
            "params": float(compute.params),
            "latency_us_per_sample": latency * 1e6,
        },
        split,
    )
    ctx.points.append(
        {
            "label": ctx.label,
            "accuracy": metrics["accuracy"],
            "flops": compute.flops_per_sample,
            "params": compute.params,
            "latency_us": latency * 1e6,
            "split": split,
        }
    )
