"""Stages for sparse modular wiring: ``sparsify`` a trained model into group-connected layers."""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field

from brickwork.analysis.compute import count_params
from brickwork.experiment.context import StageContext
from brickwork.nn.sparse import GroupLinear, Level, Rewiring
from brickwork.nn.sparse.schedule import Decay
from brickwork.ops.sparsify import Criterion, apply_sparsify, linear_targets, plan_sparsify, sparse_layout
from brickwork.registry import register
from brickwork.train import build_loss, evaluate


@register("stage", "sparsify")
def sparsify_stage(
    ctx: StageContext,
    /,
    groups: Annotated[int, Field(ge=1)] = 16,
    density: Annotated[float, Field(gt=0, le=1)] = 0.5,
    criterion: Criterion = "correlation",
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    max_samples: Annotated[int, Field(ge=1)] = 2048,
    regrow: Literal["none", "random", "gradient", "hebbian"] = "none",
    level: Level = "group",
    interval: Annotated[int, Field(ge=1)] = 100,
    fraction: Annotated[float, Field(ge=0, le=1)] = 0.3,
    decay: Decay = "cosine",
    stop: Annotated[float, Field(gt=0, le=1)] = 0.75,
) -> None:
    """Replace the model's dense linear layers by group-connected ones chosen on training data.

    The model is replaced by a converted copy (``ops.sparsify``); a following ``train`` stage
    fine-tunes it, with dynamic rewiring when ``regrow`` is not ``none``. Metrics: parameters
    before and after, mean fraction of trained weight mass kept, validation accuracy right after
    the conversion (before any fine-tuning).
    """
    torch.manual_seed(ctx.seed)
    exclude = ["head.*"] if exclude is None else exclude
    if not linear_targets(ctx.model, groups, include, exclude):
        ctx.metrics["sparsify_layers"] = 0
        ctx.report.append("Sparsify: no dense linear layer to convert; the model is unchanged.")
        return
    x = ctx.data.train.x
    batches = (x[i : i + 256].to(ctx.device) for i in range(0, len(x), 256))
    copied, choices = plan_sparsify(ctx.model, batches, groups=groups, density=density, criterion=criterion,
                                    include=include, exclude=exclude,
                                    max_samples=max_samples, seed=ctx.seed)
    params_before = count_params(ctx.model)
    model = apply_sparsify(copied, choices)
    if regrow != "none":
        for m in model.modules():
            if isinstance(m, GroupLinear):
                m.set_rewiring(Rewiring(regrow, level, interval, fraction, decay, stop).to(ctx.device))
    ctx.model = model
    ctx.structure.append({"op": "sparsify", "layers": sparse_layout(model, [c.path for c in choices])})
    kept = [c.kept_mass for c in choices]
    ctx.metrics.update({
        "sparsify_params_before": params_before,
        "sparsify_params_after": count_params(model),
        "sparsify_kept_mass": sum(kept) / len(kept),
        "sparsify_layers": len(choices),
    })
    if len(ctx.data.val):
        ctx.metrics["sparsify_val_accuracy"] = evaluate(model, ctx.data.val, build_loss("cross_entropy"),
                                                        device=ctx.device)["accuracy"]
    rows = [f"| {c.path} | {c.groups} | {c.sources.shape[1]} | {'yes' if c.out_perm is not None else 'no'} | "
            f"{c.kept_mass:.3f} |" for c in choices]
    ctx.report.append("\n".join([
        f"Sparsified at density {density} ({criterion} criterion): each output group reads "
        f"{choices[0].sources.shape[1]} of {groups} input groups.",
        "",
        "| layer | groups | k | outputs regrouped (absorbed) | weight mass kept |",
        "|---|---|---|---|---|",
        *rows,
    ]))
