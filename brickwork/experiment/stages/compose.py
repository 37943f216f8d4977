"""The ``compose`` stage: train specialists on subsets of the data, compose them by averaging their logits.

Growing Transformers (Bochkov, 2025, arXiv 2507.07129) trains specialists on disparate data, all
on one frozen embedding substrate, and merges them post-training by averaging their output
logits. Here the specialists are copies of the variant's model (bodies and heads re-drawn, the
stem shared and frozen), each trained on one part of the training split: ``classes`` (a
classification task's classes cut into contiguous groups) or ``random`` (disjoint random parts:
for text, whose training windows are stored shuffled). The model becomes the
:class:`~brickwork.nn.ensemble.Ensemble`; the recipe lets resume and reloads rebuild it. The
training FLOPs of every specialist are counted (``train.layerwise``) and summed.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
from pydantic import Field

from brickwork.data.base import Split
from brickwork.errors import BrickworkError
from brickwork.experiment.context import StageContext
from brickwork.experiment.report import markdown_table
from brickwork.nn.ensemble import Combine
from brickwork.ops.layerwise import specialists as make_specialists
from brickwork.registry import Flatten, register
from brickwork.train import build_loss, evaluate
from brickwork.train.layerwise import train_phase
from brickwork.train.recipe import DEFAULT_TRAINING, TrainSettings

#: How the training split is cut into one part per specialist.
SplitBy = Literal["random", "classes"]


def _parts(train: Split, count: int, by: SplitBy, seed: int, task: str) -> list[Split]:
    """``count`` disjoint parts of ``train``: random, or by contiguous groups of class labels."""
    if by == "classes":
        if task != "classify":
            raise BrickworkError("compose: split 'classes' needs a classification task; use split: random")
        labels = torch.unique(train.y)
        if len(labels) < count:
            raise BrickworkError(f"compose: {count} specialists but only {len(labels)} classes to split")
        groups = torch.tensor_split(labels, count)
        masks = [torch.isin(train.y, g) for g in groups]
        return [Split(train.x[m], train.y[m]) for m in masks]
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    return [Split(train.x[i], train.y[i]) for i in torch.tensor_split(order, count)]


@register("stage", "compose")
def compose_stage(
    ctx: StageContext,
    /,
    specialists: Annotated[int, Field(ge=1)] = 2,
    split: SplitBy = "random",
    combine: Combine = "logits",
    share_stem: bool = True,
    settings: Annotated[TrainSettings, Flatten] = DEFAULT_TRAINING,
) -> None:
    """Train ``specialists`` specialists, one per part of the training split, and average them.

    Args:
        specialists: how many specialists (and parts of the training split).
        split: ``random`` disjoint parts, or ``classes`` (contiguous groups of class labels).
        combine: average ``logits`` (Growing Transformers) or ``probs``.
        share_stem: the specialists share the variant's stem, frozen (the substrate), and the
            composed model runs it once; otherwise each has its own trained copy.
        settings: the training recipe of each specialist.
    """
    torch.manual_seed(ctx.seed)
    parts = _parts(ctx.data.train, specialists, split, ctx.seed, ctx.data.task)
    model = make_specialists(ctx.model, specialists, share_stem=share_stem, seed=ctx.seed * 1_000, combine=combine)
    model = model.to(ctx.device)
    loss = build_loss("cross_entropy")
    rows: list[dict[str, Any]] = []
    total = 0.0
    for i, (member, part) in enumerate(zip(model.members, parts, strict=True)):
        result = train_phase(
            member,
            ["body.*", "head.*"] if share_stem else ["*"],
            part,
            ctx.data.val,
            settings,
            seed=ctx.seed + i,
            device=ctx.device,
            state_path=ctx.stage_path(f"specialist{i}"),
            aux_weights=ctx.aux_weights,
            progress=ctx.progress,
            desc=f"compose {ctx.label} specialist {i}",
            log_dir=ctx.tensorboard_dir(f"specialist{i}"),
        )
        total += result.flops
        ctx.history.extend({**h, "specialist": i} for h in result.history)
        val = evaluate(member, ctx.data.val, loss, device=ctx.device) if len(ctx.data.val) else {}
        rows.append({"model": f"specialist {i}", "samples": len(part), "flops": result.flops, **val})
    for p in model.parameters():
        p.requires_grad_(True)
    if len(ctx.data.val):
        val = evaluate(model, ctx.data.val, loss, device=ctx.device)
        rows.append({"model": f"composed ({combine} averaged)", "samples": len(ctx.data.train), "flops": total, **val})
        ctx.metrics.update(compose_val_accuracy=val["accuracy"], compose_val_loss=val["loss"])
        for i, r in enumerate(rows[:-1]):
            ctx.metrics[f"specialist{i}_val_accuracy"] = r["accuracy"]
    ctx.model = model
    ctx.structure.append({"op": "compose", "members": specialists, "combine": combine, "share_stem": share_stem})
    ctx.metrics["train_flops"] = ctx.metrics.get("train_flops", 0.0) + total
    ctx.report.append(
        "\n".join(
            [
                f"### Composition of {specialists} specialists ({split} parts of the training split, "
                f"{combine} averaged{', one shared frozen stem' if share_stem else ''})",
                "",
                markdown_table(
                    rows,
                    [
                        ("model", "model", "{}"),
                        ("samples", "training samples", "{:,}"),
                        ("flops", "training FLOPs", "{:.4g}"),
                        ("loss", "val loss", "{:.4f}"),
                        ("accuracy", "val accuracy", "{:.4f}"),
                    ],
                ),
            ]
        )
    )
