"""The ``sema`` stage: continual learning on a frozen backbone with SEMA, against its two baselines.

The variant's model (trained by earlier stages: the pre-trained backbone) is frozen, and the
classes of ``task_data`` are learned as a class-incremental sequence of tasks by each method of
``methods`` (``train.sema.continual``): SEMA's self-expanding mixture of adapters, a fixed set of
adapters, sequential fine-tuning. The model becomes SEMA's (or the first method's), with a recipe
so resume and reloading rebuild it. Reported per method: average accuracy over all tasks after the
last one, forgetting, the adapters it ended with, training FLOPs, inference FLOPs per sample.
A later stage on the variant's own data (``evaluate``) would not match the task heads: put the
``sema`` stage last.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from pydantic import Field

from brickwork.analysis.compute import measure_compute
from brickwork.data import load_dataset
from brickwork.data.batching import input_batches
from brickwork.experiment.context import StageContext
from brickwork.experiment.report import markdown_table
from brickwork.registry import Flatten, register
from brickwork.train.recipe import DEFAULT_TRAINING, TrainSettings
from brickwork.train.sema import ContinualResult, Method, average_accuracy, class_tasks, continual, forgetting


@register("stage", "sema")
def sema_stage(
    ctx: StageContext,
    /,
    task_data: str = "fashion-mnist",
    classes_per_task: Annotated[int, Field(ge=1)] = 2,
    samples_per_task: Annotated[int, Field(ge=1)] | None = None,
    methods: list[Method] | None = None,
    rank: Annotated[int, Field(ge=1)] = 16,
    descriptor_rank: Annotated[int, Field(ge=1)] = 16,
    threshold: Annotated[float, Field(gt=0)] = 1.5,
    detect_samples: Annotated[int, Field(ge=2)] = 512,
    settings: Annotated[TrainSettings, Flatten] = DEFAULT_TRAINING,
) -> None:
    """Learn ``task_data``'s classes, ``classes_per_task`` at a time, on the frozen model with each method.

    Args:
        task_data: a registered classification dataset (default arguments, seeded by the run).
        classes_per_task: classes per task (consecutive labels).
        samples_per_task: training samples per task (default all).
        methods: any of ``sema``, ``fixed``, ``finetune`` (default all three).
        rank: adapter bottleneck width.
        descriptor_rank: representation descriptor (autoencoder) code width.
        threshold: SEMA adds an adapter to a layer when the smallest mean z-score of its
            descriptors' reconstruction losses on the new task exceeds this.
        detect_samples: new-task training samples the shift is measured on.
        settings: the training recipe of every phase.
    """
    torch.manual_seed(ctx.seed)
    chosen: list[Method] = list(methods) if methods else ["sema", "fixed", "finetune"]
    tasks = class_tasks(load_dataset(task_data, seed=ctx.seed), classes_per_task, samples_per_task)
    results: dict[Method, ContinualResult] = {}
    for method in chosen:
        results[method] = continual(
            ctx.model,
            tasks,
            method,
            settings,
            rank=rank,
            descriptor_rank=descriptor_rank,
            threshold=threshold,
            detect_samples=detect_samples,
            seed=ctx.seed,
            device=ctx.device,
            state_dir=ctx.dir,
            state_prefix=f"stage{ctx.stage}-{method}-",
            progress=ctx.progress,
            log_dir=ctx.tensorboard_dir(method),
        )
    probe = torch.cat([t.test.x[:64] for t in tasks])
    rows: list[dict[str, Any]] = []
    for method, r in results.items():
        cost = measure_compute(r.model, input_batches(probe, 256, device=ctx.device))
        row = {
            "method": method,
            "average_accuracy": r.average_accuracy,
            "forgetting": r.forgetting,
            "task_accuracy": average_accuracy(r.task_accuracy),
            "task_forgetting": forgetting(r.task_accuracy),
            "adapters": sum(r.adapters),
            "per_layer": "/".join(map(str, r.adapters)),
            "train_flops": r.train_flops,
            "flops": cost.flops_per_sample,
            "params": cost.params,
        }
        rows.append(row)
        ctx.metrics.update(
            {
                f"{method}_average_accuracy": r.average_accuracy,
                f"{method}_forgetting": r.forgetting,
                f"{method}_task_aware_accuracy": row["task_accuracy"],
                f"{method}_task_aware_forgetting": row["task_forgetting"],
                f"{method}_adapters": sum(r.adapters),
                f"{method}_train_flops": r.train_flops,
            }
        )
        ctx.points.append({"label": f"{ctx.label} {method}", "accuracy": r.average_accuracy, "flops": row["flops"]})
    final = results.get("sema", results[chosen[0]])
    ctx.model = final.model
    ctx.structure.append(
        {
            "op": "sema",
            "rank": rank,
            "descriptor_rank": descriptor_rank,
            "adapters": final.adapters,
            "classes": [t.count for t in tasks],
        }
    )
    section = [
        f"### Continual learning on {task_data}: {len(tasks)} tasks of {classes_per_task} classes "
        f"(class-incremental), backbone frozen",
        "",
        "Average accuracy and forgetting are class-incremental (answers over every class seen); the task-aware "
        "columns answer over each task's own classes, which removes the heads' bias towards recent tasks.",
        "",
        markdown_table(
            rows,
            [
                ("method", "method", "{}"),
                ("average_accuracy", "average accuracy", "{:.4f}"),
                ("forgetting", "forgetting", "{:.4f}"),
                ("task_accuracy", "task-aware accuracy", "{:.4f}"),
                ("task_forgetting", "task-aware forgetting", "{:.4f}"),
                ("adapters", "adapters", "{}"),
                ("per_layer", "per layer", "{}"),
                ("train_flops", "training FLOPs", "{:.4g}"),
                ("flops", "inference FLOPs/sample", "{:,.0f}"),
                ("params", "params", "{:,}"),
            ],
        ),
    ]
    if "sema" in results and results["sema"].decisions:
        section += [
            "",
            f"SEMA's expansion checks (smallest mean descriptor z-score per layer; expand above {threshold}):",
            "",
            markdown_table(
                results["sema"].decisions,
                [
                    ("task", "task", "{}"),
                    ("layer", "layer", "{}"),
                    ("score", "score", "{:.3f}"),
                    ("expanded", "expanded", "{}"),
                ],
            ),
        ]
    ctx.report.append("\n".join(section))
