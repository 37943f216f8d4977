"""Stages for nested (SortedNet) models: measure every sub-network, slice it out, and compare it
with a separately trained model of the same size."""

from __future__ import annotations

import time
from typing import Annotated

import torch
from pydantic import Field

from brickwork.analysis.compute import count_params
from brickwork.analysis.matryoshka import matryoshka_accuracy
from brickwork.analysis.timing import measure_latency
from brickwork.analysis.tradeoff import measure_point
from brickwork.experiment.build import build_model, model_meta, sliced_spec, variant_spec
from brickwork.experiment.context import SplitName, StageContext
from brickwork.experiment.report import POINT_COLUMNS, tradeoff_section
from brickwork.experiment.report import markdown_table as table
from brickwork.nn.nested import NestedModel, subnet_label
from brickwork.ops.slice import slice_error, slice_model
from brickwork.registry import Flatten, register
from brickwork.train.checkpoint import save_model
from brickwork.train.recipe import DEFAULT_TRAINING, TrainSettings, train_with


def _nested(ctx: StageContext) -> NestedModel:
    if not isinstance(ctx.model, NestedModel):
        raise TypeError(
            f"this stage needs a nested model (nested_mlp, nested_cnn, ...), not {type(ctx.model).__name__}"
        )
    return ctx.model


@register("stage", "nested")
def nested(
    ctx: StageContext,
    /,
    split: SplitName = "test",
    batch_size: Annotated[int, Field(ge=1)] = 256,
    latency_repeats: Annotated[int, Field(ge=1)] = 5,
) -> None:
    """Accuracy, FLOPs and latency of every sub-network, in the supernet and sliced out.

    Each sub-network runs inside the supernet (weights as views) and as its sliced standalone
    copy; the report gives the largest difference between the two outputs.
    """
    model = _nested(ctx)
    data = getattr(ctx.data, split)
    x = data.x[:batch_size].to(ctx.device)
    points, worst = [], 0.0
    for w, d in model.subnetworks():
        with model.at(w, d):
            p = measure_point(
                model,
                data,
                subnet_label(w, d),
                batch_size=batch_size,
                device=ctx.device,
                latency_repeats=latency_repeats,
                width=w,
                depth=d,
            )
        sliced = slice_model(model, w, d)
        p["slice_error"] = slice_error(model, sliced, x, w, d)
        p["params"] = count_params(sliced)
        p["sliced_latency_us"] = measure_latency(sliced, x, repeats=latency_repeats) * 1e6
        worst = max(worst, p["slice_error"])
        points.append(p)
    ctx.points.extend(points)
    ctx.metrics.update(
        nested_subnetworks=len(points),
        nested_min_accuracy=min(p["accuracy"] for p in points),
        nested_slice_max_error=worst,
    )
    report = [
        f"### Sub-networks ({split})",
        "Latency in the supernet (weights sliced as views) and of the sliced standalone model, batch "
        f"{len(x)}; `slice error` is the largest |difference| between the two outputs.",
        table(
            points,
            [
                *POINT_COLUMNS,
                ("sliced_latency_us", "sliced µs/sample", "{:.2f}"),
                ("slice_error", "slice error", "{:.1e}"),
            ],
        ),
        *tradeoff_section(ctx, points, "nested", "Nested sub-networks"),
    ]
    if model.matryoshka:
        report += [
            "Matryoshka: accuracy of the full network's head on the first m features:",
            table(
                matryoshka_accuracy(model, data, batch_size, ctx.device),
                [("size", "m", "{}"), ("accuracy", "accuracy", "{:.4f}")],
            ),
        ]
    ctx.report.extend(report)


@register("stage", "nested_baselines")
def nested_baselines(
    ctx: StageContext,
    /,
    training: Annotated[TrainSettings, Flatten] = DEFAULT_TRAINING,
    target: Annotated[float, Field(gt=0, le=1)] = 0.96,
    split: SplitName = "test",
    eval_batch_size: Annotated[int, Field(ge=1)] = 256,
) -> None:
    """Train a separate model of each sub-network's size and report the accuracy ratios.

    Each separate model is built from scratch with the sub-network's architecture and trained
    with ``training`` (:class:`~brickwork.train.recipe.TrainSettings`, the ``train`` stage's keys;
    use the same values as that stage); the report gives each sub-network's
    accuracy as a fraction of it (SortedNet: every sub-network keeps >= 96%).
    """
    model = _nested(ctx)
    spec = variant_spec(ctx.run_dir, ctx.label)
    data = getattr(ctx.data, split)
    rows, points = [], []
    for w, d in model.subnetworks():
        label = subnet_label(w, d)
        torch.manual_seed(ctx.seed)
        small = sliced_spec(spec, w, d, f"models.{ctx.label}")
        base = build_model(small, ctx.data.in_shape, ctx.data.num_classes).to(ctx.device)
        folder = ctx.stage_path(f"baseline-{label}")  # this stage's own folder: resumable, no collisions
        folder.mkdir(exist_ok=True)
        t0 = time.perf_counter()
        train_with(
            base,
            ctx.data.train,
            ctx.data.val,
            training,
            seed=ctx.seed,
            aux_weights=ctx.aux_weights,
            device=ctx.device,
            state_path=folder / "train_state",
            progress=ctx.progress,
            desc=f"baseline {label}",
            log_dir=ctx.tensorboard_dir(f"baseline-{label}"),
        )
        save_model(folder / "model", base, model_meta(small, ctx.data, baseline_of=label))
        p = measure_point(
            base, data, f"separate {label}", batch_size=eval_batch_size, device=ctx.device, latency_repeats=1
        )
        with model.at(w, d):
            nested_p = measure_point(
                model, data, label, batch_size=eval_batch_size, device=ctx.device, latency_repeats=1
            )
        rows.append(
            {
                "subnet": label,
                "params": p["params"],
                "flops": p["flops"],
                "nested": nested_p["accuracy"],
                "separate": p["accuracy"],
                "ratio": nested_p["accuracy"] / max(p["accuracy"], 1e-12),
                "seconds": time.perf_counter() - t0,
            }
        )
        points.append(p)
    met = sum(r["ratio"] >= target for r in rows)
    ctx.points.extend(points)
    ctx.metrics.update(nested_min_ratio=min(r["ratio"] for r in rows), nested_subnets_at_target=met)
    ctx.report.extend(
        [
            f"### Sub-networks against separately trained models ({split})",
            f"Each separate model has the sub-network's exact architecture, is initialised from seed {ctx.seed} and "
            f"trained alone with the same recipe ({training.epochs} epochs, batch {training.batch_size}, "
            f"{training.optimizer} lr {training.lr}). "
            f"**{met} of {len(rows)} sub-networks keep at least {target:.0%} of the separate model's accuracy** "
            f"(lowest ratio {min(r['ratio'] for r in rows):.4f}).",
            table(
                rows,
                [
                    ("subnet", "sub-network", "{}"),
                    ("params", "params", "{:,}"),
                    ("flops", "FLOPs/sample", "{:,.0f}"),
                    ("nested", "nested acc", "{:.4f}"),
                    ("separate", "separate acc", "{:.4f}"),
                    ("ratio", "ratio", "{:.4f}"),
                    ("seconds", "train s", "{:.1f}"),
                ],
            ),
        ]
    )
