"""Stages for sparse modular wiring: ``sparsify`` a trained model into group-connected layers."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from brickwork.analysis.compute import count_params
from brickwork.data.batching import input_batches
from brickwork.experiment.context import StageContext
from brickwork.experiment.report import markdown_table
from brickwork.nn.sparse import GroupLinear, RewiringSettings
from brickwork.ops.sparsify import Criterion, apply_sparsify, linear_targets, plan_sparsify, sparse_layout
from brickwork.registry import Flatten, register
from brickwork.train import build_loss, evaluate

_STATIC = RewiringSettings()  # frozen: safe to share as a default


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
    rewiring: Annotated[RewiringSettings, Flatten] = _STATIC,
) -> None:
    """Replace the model's dense linear layers by group-connected ones chosen on training data.

    The model is replaced by a converted copy (``ops.sparsify``); a following ``train`` stage
    fine-tunes it, with dynamic rewiring when ``regrow`` is not ``none`` (``rewiring``: the
    :class:`~brickwork.nn.sparse.RewiringSettings` keys, as for ``sparse_mlp``). Metrics:
    parameters before and after, mean fraction of trained weight mass kept, validation accuracy
    right after the conversion (before any fine-tuning).
    """
    torch.manual_seed(ctx.seed)
    exclude = ["head.*"] if exclude is None else exclude
    if not linear_targets(ctx.model, groups, include, exclude):
        ctx.metrics["sparsify_layers"] = 0
        ctx.report.append("Sparsify: no dense linear layer to convert; the model is unchanged.")
        return
    batches = input_batches(ctx.data.train.x, 256, device=ctx.device)
    copied, choices = plan_sparsify(
        ctx.model,
        batches,
        groups=groups,
        density=density,
        criterion=criterion,
        include=include,
        exclude=exclude,
        max_samples=max_samples,
        seed=ctx.seed,
    )
    params_before = count_params(ctx.model)
    model = apply_sparsify(copied, choices)
    for m in model.modules():  # a fresh policy per layer: each keeps its own statistics
        if isinstance(m, GroupLinear) and (policy := rewiring.policy()) is not None:
            m.set_rewiring(policy.to(ctx.device))
    ctx.model = model
    ctx.structure.append({"op": "sparsify", "layers": sparse_layout(model, [c.path for c in choices])})
    kept = [c.kept_mass for c in choices]
    ctx.metrics.update(
        {
            "sparsify_params_before": params_before,
            "sparsify_params_after": count_params(model),
            "sparsify_kept_mass": sum(kept) / len(kept),
            "sparsify_layers": len(choices),
        }
    )
    if len(ctx.data.val):
        ctx.metrics["sparsify_val_accuracy"] = evaluate(
            model, ctx.data.val, build_loss("cross_entropy"), device=ctx.device
        )["accuracy"]
    rows = [
        {
            "path": c.path,
            "groups": c.groups,
            "k": c.sources.shape[1],
            "absorbed": "yes" if c.out_perm is not None else "no",
            "kept": c.kept_mass,
        }
        for c in choices
    ]
    ctx.report.append(
        "\n".join(
            [
                f"Sparsified at density {density} ({criterion} criterion): each output group reads "
                f"{choices[0].sources.shape[1]} of {groups} input groups.",
                "",
                markdown_table(
                    rows,
                    [
                        ("path", "layer", "{}"),
                        ("groups", "groups", "{}"),
                        ("k", "k", "{}"),
                        ("absorbed", "outputs regrouped (absorbed)", "{}"),
                        ("kept", "weight mass kept", "{:.3f}"),
                    ],
                ),
            ]
        )
    )
