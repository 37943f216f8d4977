"""The stitching stage: a family of models between two trained anchors of one run (SN-Net)."""

from __future__ import annotations

from typing import Annotated, Any

import torch
from pydantic import Field
from torch import nn

from brickwork.analysis.tradeoff import measure_point
from brickwork.experiment.artifacts import earlier_variant
from brickwork.experiment.context import SplitName, StageContext
from brickwork.experiment.report import POINT_COLUMNS, tradeoff_section
from brickwork.experiment.report import markdown_table as table
from brickwork.nn.stack import StackModel, stack_of
from brickwork.ops.stitch import default_cuts, stitched
from brickwork.registry import register
from brickwork.train import FitConfig, build_loss, fit


def _fine_tune(
    ctx: StageContext,
    model: StackModel,
    layer: nn.Module,
    epochs: int,
    lr: float,
    batch_size: int,
    desc: str,
    curves: str,
) -> None:
    """Train only ``layer`` inside ``model``; every other part stays frozen, batch-norm statistics included.

    ``curves`` names the TensorBoard folder of this fine-tuning (``ctx.tensorboard_dir``).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    for p in layer.parameters():
        p.requires_grad_(True)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.0
    torch.manual_seed(ctx.seed)
    fit(
        model,
        ctx.data.train,
        ctx.data.val,
        build_loss("cross_entropy"),
        torch.optim.AdamW(layer.parameters(), lr=lr),
        FitConfig(epochs=epochs, batch_size=batch_size, seed=ctx.seed, device=ctx.device),
        progress=ctx.progress,
        desc=desc,
        log_dir=ctx.tensorboard_dir(curves),
    )
    model.eval()


@register("stage", "stitch")
def stitch_stage(
    ctx: StageContext,
    /,
    front: str,
    cuts: list[tuple[Annotated[int, Field(ge=0)], Annotated[int, Field(ge=0)]]] | None = None,
    reverse: bool = True,
    fit_samples: Annotated[int, Field(ge=1)] = 2048,
    epochs: Annotated[int, Field(ge=0)] = 1,
    lr: Annotated[float, Field(gt=0)] = 1e-3,
    batch_size: Annotated[int, Field(ge=1)] = 64,
    split: SplitName = "test",
    eval_batch_size: Annotated[int, Field(ge=1)] = 256,
    latency_repeats: Annotated[int, Field(ge=1)] = 5,
) -> None:
    """A stitched family between variant ``front`` and this one (SN-Net): least squares, then fine-tuning.

    Joins the first layers of variant ``front`` (trained earlier in this run: list it first under
    ``models:``) to the last layers of this variant at each cut ``(front layers, back from)``, and
    with ``reverse`` also this variant's first layers to ``front``'s last ones (cuts swapped).
    Each stitching layer is fitted by least squares on ``fit_samples`` training inputs, then
    fine-tuned alone for ``epochs`` (the anchors' copies inside the stitched model are frozen,
    batch-norm statistics included). In the ``front`` variant itself this stage does nothing.
    """
    if ctx.label == front:
        return
    anchor = earlier_variant(ctx, front, "stitch")
    models = {front: stack_of(anchor.model.to(ctx.device)), ctx.label: stack_of(ctx.model)}
    data = getattr(ctx.data, split)
    x_fit = ctx.data.train.x[:fit_samples].to(ctx.device)
    kw: dict[str, Any] = {"batch_size": eval_batch_size, "device": ctx.device, "latency_repeats": latency_repeats}
    points = [measure_point(m, data, label, **kw) for label, m in models.items()]
    pairs = [(front, ctx.label)] + ([(ctx.label, front)] if reverse else [])
    for a, b in pairs:
        ma, mb = models[a], models[b]
        cut_list = (
            default_cuts(len(ma.body), len(mb.body))
            if not cuts
            else ([tuple(c) for c in cuts] if a == front else [(j, i) for i, j in cuts])
        )
        for i, j in cut_list:
            model, residual = stitched(ma, mb, i, j, x_fit)
            label = f"{a}[:{i}]+{b}[{j}:]"
            ls_acc = measure_point(model, data, label, **kw)["accuracy"]
            if epochs:
                layer = model.body.layers[i]
                _fine_tune(ctx, model, layer, epochs, lr, batch_size, f"stitch {label}", f"{a}{i}-{b}{j}")
            points.append(measure_point(model, data, label, **kw, residual=residual, ls_accuracy=ls_acc))
    ctx.points.extend(points[2:])
    ctx.report.extend(
        [
            f"### Stitched family between {front} and {ctx.label} ({split})",
            "`a[:i]+b[j:]`: the stem and first i body layers of a, a linear stitching layer, then b's body layers from "
            f"j and its head. Least-squares fit on {len(x_fit)} training inputs (relative residual), accuracy after "
            f"the fit alone, then after fine-tuning the stitching layer alone for {epochs} epoch(s).",
            table(
                points,
                [*POINT_COLUMNS, ("residual", "LS residual", "{:.3f}"), ("ls_accuracy", "acc after LS", "{:.4f}")],
            ),
            *tradeoff_section(ctx, points, "stitch", "Stitched family"),
        ]
    )
