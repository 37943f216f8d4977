"""Stages that grow a model: ``grow`` (one function-preserving step), ``upcycle`` (dense FFNs into
experts) and ``train_budget`` (training with its FLOPs counted, optionally matched to another
variant's: the equal-compute comparisons of the growth experiments).

``grow`` and ``upcycle`` replace ``ctx.model`` by the grown copy (``ops.grow``) and record a
recipe that ``experiment.build`` replays, so ``--resume`` and reloading work past them. Each
reports what the step did: parameters and FLOPs per sample before and after, and the largest
change of the model's outputs on test samples (zero up to float round-off: the operations are
function-preserving).
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

import torch
from pydantic import Field

from brickwork.analysis.compute import measure_compute
from brickwork.data.batching import input_batches
from brickwork.errors import BrickworkError
from brickwork.experiment.artifacts import earlier_variant
from brickwork.experiment.context import StageContext
from brickwork.experiment.report import markdown_table
from brickwork.nn.modes import evaluating
from brickwork.nn.routing import MoESettings
from brickwork.ops.grow import GrowSettings, apply_grow, upcycle, upcycle_recipe
from brickwork.registry import Flatten, register
from brickwork.train.budget import flops_per_sample
from brickwork.train.layerwise import train_phase
from brickwork.train.recipe import DEFAULT_TRAINING, TrainSettings

_ROUTING = MoESettings()  # frozen: safe to share as a default


def _measure(ctx: StageContext, before: torch.nn.Module, after: torch.nn.Module, samples: int) -> dict[str, float]:
    """Output change, parameters and FLOPs per sample of a growth step, on test samples."""
    x = ctx.data.test.x[:samples].to(ctx.device)
    with torch.no_grad(), evaluating(before), evaluating(after):
        gap = float((before(x).double() - after(x).double()).abs().max())
    old = measure_compute(before, input_batches(x, 64), max_samples=samples)
    new = measure_compute(after, input_batches(x, 64), max_samples=samples)
    return {
        "max_output_change": gap,
        "params_before": old.params,
        "params_after": new.params,
        "flops_before": old.flops_per_sample,
        "flops_after": new.flops_per_sample,
    }


def _report(ctx: StageContext, title: str, m: dict[str, float], samples: int) -> None:
    rows = [
        {"model": "before", "params": m["params_before"], "flops": m["flops_before"]},
        {"model": "after", "params": m["params_after"], "flops": m["flops_after"]},
    ]
    cols = [("model", "model", "{}"), ("params", "parameters", "{:,}"), ("flops", "FLOPs/sample", "{:,.0f}")]
    ctx.report.append(
        "\n".join(
            [
                f"### {title}",
                "",
                f"Largest change of an output on {min(samples, len(ctx.data.test))} test samples: "
                f"{m['max_output_change']:.3g} (function-preserving: float round-off only).",
                "",
                markdown_table(rows, cols),
            ]
        )
    )


@register("stage", "grow")
def grow_stage(
    ctx: StageContext,
    /,
    step: Annotated[GrowSettings, Flatten],
    variants: list[str] | None = None,
    eval_samples: Annotated[int, Field(ge=1)] = 256,
) -> None:
    """Grow the model by one function-preserving step (``op`` and its arguments, flat keys).

    Args:
        step: the operation and its arguments (:class:`~brickwork.ops.grow.GrowSettings`).
        variants: model labels to grow (default all; the others pass unchanged).
        eval_samples: test samples the output change and FLOPs are measured on.
    """
    if variants is not None and ctx.label not in variants:
        return
    grown = apply_grow(ctx.model, step).to(ctx.device)
    m = _measure(ctx, ctx.model, grown, eval_samples)
    ctx.model = grown
    ctx.structure.append(step.recipe())
    ctx.metrics.update({f"grow_{k}": v for k, v in m.items()})
    _report(ctx, f"Grow: {step.op}", m, eval_samples)


@register("stage", "upcycle")
def upcycle_stage(
    ctx: StageContext,
    /,
    experts: Annotated[int, Field(ge=1)] = 8,
    granularity: Annotated[int, Field(ge=1)] = 1,
    layers: list[int] | None = None,
    routing: Annotated[MoESettings, Flatten] = _ROUTING,
    variants: list[str] | None = None,
    eval_samples: Annotated[int, Field(ge=1)] = 256,
) -> None:
    """Upcycle the model's dense FFNs into mixtures of ``experts`` experts (sparse upcycling).

    Args:
        experts: E per layer.
        granularity: G slices per FFN (fine-grained experts; 1: full copies).
        layers: body layers to convert (default all).
        routing: router, ``top_k`` and balancing of the new MoEs (flat keys).
        variants: model labels to upcycle (default all; the others pass unchanged).
        eval_samples: test samples the output change and FLOPs are measured on.
    """
    if variants is not None and ctx.label not in variants:
        return
    torch.manual_seed(ctx.seed)
    moe = upcycle(ctx.model, experts, routing, granularity, layers, seed=ctx.seed).to(ctx.device)
    m = _measure(ctx, ctx.model, moe, eval_samples)
    ctx.model = moe
    ctx.structure.append(upcycle_recipe(experts, routing, granularity, layers))
    ctx.metrics.update({f"upcycle_{k}": v for k, v in m.items()})
    _report(ctx, f"Upcycle: {experts} experts, top-{routing.top_k}, granularity {granularity}", m, eval_samples)


@register("stage", "train_budget")
def train_budget_stage(
    ctx: StageContext,
    /,
    match: str | None = None,
    settings: Annotated[TrainSettings, Flatten] = DEFAULT_TRAINING,
) -> None:
    """Train the whole model, counting its training FLOPs; with ``match``, at another variant's budget.

    The training FLOPs are one metered forward + backward step per sample (the one accounting,
    ``analysis.compute``, through ``train.layerwise``) times the samples trained on; they are
    added to the variant's ``train_flops`` and kept per stage as ``train_flops_stage<k>``.

    Args:
        match: a variant listed earlier; every other variant then trains for the epoch count
            whose training FLOPs come closest to what that variant spent in the same stage (at
            least 1); the named variant itself trains as configured.
        settings: the training recipe (``epochs`` is the count when ``match`` is not given).
    """
    key = f"train_flops_stage{ctx.stage}"
    torch.manual_seed(ctx.seed)
    if match == ctx.label:  # the named variant is the reference: it trains as configured
        match = None
    if match is not None:
        ref = earlier_variant(ctx, match, "train_budget").meta.get("metrics", {})
        if key not in ref:
            raise BrickworkError(f"train_budget: variant {match!r} has no {key}; it must run this stage unmatched")
        budget = float(ref[key])
        per_epoch = flops_per_sample(ctx.model, ctx.data.train, settings, ctx.device) * len(ctx.data.train)
        settings = dataclasses.replace(settings, epochs=max(1, round(budget / per_epoch)))
        ctx.metrics[f"train_flops_budget_stage{ctx.stage}"] = budget
    result = train_phase(
        ctx.model,
        ["*"],
        ctx.data.train,
        ctx.data.val,
        settings,
        seed=ctx.seed,
        device=ctx.device,
        state_path=ctx.stage_path("train_state"),
        aux_weights=ctx.aux_weights,
        progress=ctx.progress,
        desc=f"train_budget {ctx.label}",
        log_dir=ctx.tensorboard_dir("train_budget"),
    )
    ctx.history.extend({**h, "stage": ctx.stage} for h in result.history)
    ctx.metrics[key] = result.flops
    ctx.metrics["train_flops"] = ctx.metrics.get("train_flops", 0.0) + result.flops
    ctx.metrics["train_seconds"] = ctx.metrics.get("train_seconds", 0.0) + sum(h["seconds"] for h in result.history)
    last: dict[str, Any] = result.history[-1] if result.history else {}
    if "val_accuracy" in last:
        ctx.metrics["val_accuracy"] = last["val_accuracy"]
    ctx.report.append(
        f"Trained {ctx.label} for {settings.epochs} epochs at {result.step_flops_per_sample:,.0f} training "
        f"FLOPs per sample: {result.flops:.4g} training FLOPs"
        + (f" (matching {match!r}: {ctx.metrics[f'train_flops_budget_stage{ctx.stage}']:.4g})." if match else ".")
    )
