"""The ``gamma_mod`` stage: the lowest-ARank layers become mixture-of-depths layers (gamma-MoD)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from brickwork.experiment.context import StageContext
from brickwork.experiment.report import markdown_table
from brickwork.nn.stack import stack_of
from brickwork.ops.gamma_mod import Choice, body_aranks, choose_layers, gamma_mod
from brickwork.registry import register
from brickwork.train import build_loss, evaluate


@register("stage", "gamma_mod")
def gamma_mod_stage(
    ctx: StageContext,
    /,
    choice: Choice = "arank",
    num_mod: Annotated[int, Field(ge=0)] = 1,
    capacity: Annotated[float, Field(gt=0, le=1)] = 0.5,
    tanh_scale: Annotated[float, Field(gt=0)] = 0.2,
    samples: Annotated[int, Field(ge=1)] = 256,
) -> None:
    """Convert body layers of a trained transformer into MoD layers (``ops.gamma_mod``).

    ARank of every body layer is measured on ``samples`` training inputs; ``choice: arank``
    converts the ``num_mod`` lowest (gamma-MoD, Luo et al., 2024), ``last`` the last ``num_mod``,
    ``all`` every layer (``num_mod`` unused); each processes the top ``capacity`` of its tokens.
    The model is replaced by the converted copy and the recipe recorded (resume and reload replay
    it); a following ``train`` stage fine-tunes it. Metrics: the layers, their ARank, validation
    accuracy right after the conversion.
    """
    model = stack_of(ctx.model)
    ranks = body_aranks(model, ctx.data.train.x[:samples].to(ctx.device))
    layers = choose_layers(ranks, num_mod, choice)
    converted, recipe = gamma_mod(model, layers, capacity, tanh_scale)
    ctx.model = converted
    ctx.structure.append(recipe)
    ctx.metrics.update(
        gamma_mod_layers=",".join(map(str, layers)), gamma_mod_capacity=capacity, gamma_mod_choice=choice
    )
    for i, r in enumerate(ranks):
        ctx.metrics[f"arank_layer{i}"] = r
    if len(ctx.data.val):
        ctx.metrics["gamma_mod_val_accuracy"] = evaluate(
            converted, ctx.data.val, build_loss("cross_entropy"), device=ctx.device
        )["accuracy"]
    rows = [{"layer": i, "arank": r, "now": "MoD" if i in layers else "dense"} for i, r in enumerate(ranks)]
    ctx.report += [
        f"### gamma-MoD ({choice}): layers {layers} at capacity {capacity}",
        f"ARank measured on {min(samples, len(ctx.data.train))} training inputs.",
        markdown_table(rows, [("layer", "layer", "{}"), ("arank", "ARank", "{:.2f}"), ("now", "now", "{}")]),
    ]
