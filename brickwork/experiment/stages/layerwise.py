"""The ``grow_layers`` stage: train a shallow model, then grow it one layer at a time on a frozen substrate.

Growing Transformers (Bochkov, 2025, arXiv 2507.07129): the input embeddings stay frozen (the
substrate; here the model's own randomly initialised stem, frozen from the start, as a stand-in
for the paper's Unicode-glyph embeddings), the shallow model is trained, then repeatedly the
trained layers are frozen, a freshly initialised layer is stacked on top and only it (with the
output head, and optionally LoRA adapters over the frozen stack, the paper's v2) is trained.

With ``depth`` equal to the model's depth the stage is plain training of the whole model (stem
frozen or not), with its training FLOPs counted the same way: the from-scratch baseline of the
same experiment. ``match_flops_of`` names an earlier variant whose training FLOPs this one
matches (its epoch count chosen to come closest).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Annotated, Any

import torch
from pydantic import Field

from brickwork.errors import BrickworkError
from brickwork.experiment.artifacts import earlier_variant
from brickwork.experiment.context import StageContext
from brickwork.experiment.report import markdown_table
from brickwork.nn.stack import stack_of
from brickwork.ops.layerwise import LayerInit, add_lora_, append_layer, linear_paths, set_trainable_
from brickwork.registry import Flatten, register
from brickwork.train.budget import flops_per_sample
from brickwork.train.layerwise import PhaseResult, train_phase
from brickwork.train.recipe import DEFAULT_TRAINING, TrainSettings


@register("stage", "grow_layers")
def grow_layers_stage(
    ctx: StageContext,
    /,
    depth: Annotated[int, Field(ge=1)] = 6,
    first_epochs: Annotated[int, Field(ge=1)] | None = None,
    init: LayerInit = "fresh",
    freeze_stem: bool = True,
    train_head: bool = True,
    lora_rank: Annotated[int, Field(ge=0)] = 0,
    lora_alpha: Annotated[float, Field(gt=0)] = 1.0,
    match_flops_of: str | None = None,
    settings: Annotated[TrainSettings, Flatten] = DEFAULT_TRAINING,
) -> None:
    """Train the model, then add body layers one at a time up to ``depth``, training only each new one.

    Args:
        depth: the final number of body layers (at least the model's depth).
        first_epochs: epochs of the first phase (the shallow model, all of it but a frozen stem);
            default ``epochs``.
        init: a new layer is ``fresh`` (re-initialised, as the paper) or a ``copy`` of the top one.
        freeze_stem: keep the input embeddings frozen throughout (the substrate).
        train_head: train the output head with each new layer.
        lora_rank: with r > 0, the frozen layers' linear maps get rank-r LoRA adapters that train
            with each new layer (Growing Transformers v2).
        lora_alpha: LoRA scale numerator.
        match_flops_of: a variant of this run, listed earlier, whose ``train_flops`` every other
            variant matches: its first (and only) phase trains for the epoch count that comes
            closest. Those variants must not grow (their model is already ``depth`` deep); the
            named variant itself trains as configured.
        settings: the training recipe of every phase (``epochs`` per added layer).
    """
    model = stack_of(ctx.model)
    start = len(model.body)
    if depth < start:
        raise BrickworkError(f"grow_layers: depth {depth} is below the model's depth {start}; growing cannot shrink")
    match = match_flops_of is not None and match_flops_of != ctx.label  # the named variant is the reference
    if match and depth != start:
        raise BrickworkError(
            f"grow_layers: match_flops_of is for a from-scratch baseline, but {ctx.label!r} grows from depth {start} "
            f"to {depth}; give it depth {depth} in its model or leave match_flops_of out"
        )
    torch.manual_seed(ctx.seed)
    head = ["head.*"] if train_head else []
    first = dataclasses.replace(settings, epochs=first_epochs or settings.epochs)
    if match:
        assert match_flops_of is not None
        budget = float(earlier_variant(ctx, match_flops_of, "grow_layers").meta["metrics"]["train_flops"])
        set_trainable_(model, ["body.*", "head.*"] if freeze_stem else ["*"])
        per_epoch = flops_per_sample(model, ctx.data.train, first, ctx.device) * len(ctx.data.train)
        first = dataclasses.replace(first, epochs=max(1, round(budget / per_epoch)))
        ctx.metrics["train_flops_budget"] = budget

    def run(phase: int, trainable: list[str], recipe: TrainSettings) -> PhaseResult:
        return train_phase(
            model,
            trainable,
            ctx.data.train,
            ctx.data.val,
            recipe,
            seed=ctx.seed,
            device=ctx.device,
            state_path=ctx.stage_path(f"phase{phase}"),
            aux_weights=ctx.aux_weights,
            progress=ctx.progress,
            desc=f"grow_layers {ctx.label} depth {len(model.body)}",
            log_dir=ctx.tensorboard_dir(f"phase{phase}"),
        )

    template = copy.deepcopy(model.body.layers[-1])  # plain: adapters later wrap the stack's own layers
    results = [run(0, ["body.*", *head] if freeze_stem else ["*"], first)]
    lora: list[str] = []
    for i in range(start, depth):
        if lora_rank:
            new = linear_paths(model, [f"body.layers.{j}.*" for j in range(i)])
            add_lora_(model, new, lora_rank, lora_alpha)
            lora += new
        # The new layer's draw depends only on (seed, index): a resumed run draws the same layer.
        model = append_layer(model, template, init=init, seed=ctx.seed * 1_000 + i).to(ctx.device)
        results.append(run(i - start + 1, [f"body.layers.{i}.*", *head, *(["*lora_*"] if lora_rank else [])], settings))
    for p in model.parameters():  # later stages (evaluate, train) see an ordinary model
        p.requires_grad_(True)
    ctx.model = model
    if depth > start or lora:
        recipe = {"added": depth - start, "lora_rank": lora_rank, "lora_alpha": lora_alpha, "lora_paths": lora}
        ctx.structure.append({"op": "grow_layers", **recipe})
    _record(ctx, start, results)


def _record(ctx: StageContext, start: int, results: list[PhaseResult]) -> None:
    rows: list[dict[str, Any]] = []
    for k, r in enumerate(results):
        ctx.history.extend({**h, "phase": k} for h in r.history)
        last = r.history[-1] if r.history else {}
        rows.append(
            {
                "depth": start + k,
                "trainable": r.trainable,
                "epochs": len(r.history),
                "step": r.step_flops_per_sample,
                "flops": r.flops,
                "val_loss": last.get("val_loss", float("nan")),
                "val_accuracy": last.get("val_accuracy", float("nan")),
            }
        )
    total = sum(r.flops for r in results)
    ctx.metrics.update(
        train_flops=ctx.metrics.get("train_flops", 0.0) + total,
        grow_layers_phases=len(results),
        train_seconds=sum(h["seconds"] for r in results for h in r.history),
    )
    if rows and rows[-1]["val_accuracy"] == rows[-1]["val_accuracy"]:
        ctx.metrics["val_accuracy"] = rows[-1]["val_accuracy"]
    ctx.report.append(
        "\n".join(
            [
                f"### Layer-wise growth of {ctx.label} ({len(results) - 1} layers added; training FLOPs {total:.4g})",
                "",
                "Each phase trains the parameters listed as trainable, the rest frozen; its training FLOPs are "
                "one metered forward+backward step per sample times the samples it trained on.",
                "",
                markdown_table(
                    rows,
                    [
                        ("depth", "depth", "{}"),
                        ("trainable", "trainable params", "{:,}"),
                        ("epochs", "epochs", "{}"),
                        ("step", "train FLOPs/sample", "{:,.0f}"),
                        ("flops", "phase train FLOPs", "{:.4g}"),
                        ("val_loss", "val loss", "{:.4f}"),
                        ("val_accuracy", "val accuracy", "{:.4f}"),
                    ],
                ),
            ]
        )
    )
