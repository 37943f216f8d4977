"""The ``assemble`` and ``m2mkd`` stages: module-wise training inside a shared meta model.

``assemble`` is Deep Model Assembling (Ni et al., 2023) on the variant's model: the meta model is
pre-trained, each of the model's modules is trained in its position of the meta model on the task
loss, the modules are assembled and fine-tuned. ``m2mkd`` (Lo et al., 2024) turns the variant's
model, the teacher, into a modular student: each student module is trained to match the teacher's
module in the same position of the meta model, then the student is assembled and trained end to
end. Both compare, at equal training compute (executed FLOPs of every step, ``train.budget``),
with end-to-end training from the same initialisation (and, for ``m2mkd``, plain logit KD), and
report test accuracy, training FLOPs and inference FLOPs. The structure lives in
``ops/assemble.py``, the methods in ``train/assemble.py``.
"""

from __future__ import annotations

import copy
from typing import Annotated, Any

import torch
from pydantic import Field

from brickwork.analysis.compute import accuracy_and_flops, count_params
from brickwork.analysis.plots import plot_accuracy_vs
from brickwork.data.batching import batches
from brickwork.errors import BrickworkError, ConfigError
from brickwork.experiment.build import build_model, load, model_meta, model_spec, variant_spec
from brickwork.experiment.config import Spec
from brickwork.experiment.context import SplitName, StageContext
from brickwork.experiment.report import markdown_table as table
from brickwork.experiment.report import stage_plot_stem
from brickwork.models.nested import ModelSpec
from brickwork.nn.stack import StackModel, stack_of
from brickwork.registry import Flatten, register
from brickwork.train.assemble import PRETRAIN, Phase, Trainer, deep_model_assembling, module_to_module_kd, plain_kd
from brickwork.train.budget import epochs_for_budget
from brickwork.train.checkpoint import save_model
from brickwork.train.recipe import DEFAULT_TRAINING, TrainSettings

Epochs = Annotated[int, Field(ge=0)]
META_STEM = "meta"  # the trained meta model beside the variant's checkpoint, for a later m2mkd stage


def _meta_spec(ctx: StageContext, meta: dict[str, Any] | None, modules: int, stage: str) -> Spec:
    """The meta model's spec: ``meta`` as given, or the variant's own model with ``depth: modules``."""
    if meta is not None:
        return model_spec(meta, f"{stage}.meta")
    own = variant_spec(ctx.run_dir, ctx.label).to_dict()
    if "depth" not in own:
        raise BrickworkError(
            f"{stage}: model {own['name']!r} of variant {ctx.label!r} has no depth argument to build a shallow "
            "meta model from; give one with meta: {name: ..., ...}"
        )
    try:
        return model_spec({**own, "depth": modules}, f"{stage}.meta")
    except ConfigError as e:
        raise BrickworkError(f"{stage}: the variant's model at depth {modules} is no meta model ({e})") from None


def _build(ctx: StageContext, spec: Spec) -> StackModel:
    torch.manual_seed(ctx.seed)
    return stack_of(build_model(spec, ctx.data.in_shape, ctx.data.num_classes).to(ctx.device))


def _earlier_meta(ctx: StageContext, modules: int) -> StackModel | None:
    """The meta model an earlier ``assemble`` stage of this variant trained with ``modules`` modules, if any."""
    if not (ctx.dir / f"{META_STEM}.json").exists():
        return None
    ckpt = load(ctx.dir / META_STEM, where="m2mkd.meta")
    return stack_of(ckpt.model.to(ctx.device)) if ckpt.meta.get("modules") == modules else None


def _trainer(ctx: StageContext) -> Trainer:
    return Trainer(ctx.data.train, ctx.data.val, ctx.seed, ctx.device, dict(ctx.aux_weights), ctx.progress)


def _point(
    ctx: StageContext, model: torch.nn.Module, label: str, split: SplitName, train_flops: float | None
) -> dict[str, Any]:
    data = getattr(ctx.data, split)
    acc, flops = accuracy_and_flops(model, batches(data.x, data.y, 256, device=ctx.device))
    return {"label": label, "accuracy": acc, "flops": flops, "params": count_params(model), "train_flops": train_flops}


def _phase_rows(phases: list[Phase]) -> list[dict[str, Any]]:
    return [
        {"phase": p.name, "epochs": len(p.history), "train_flops": p.flops, "val_accuracy": p.val_accuracy}
        for p in phases
    ]


_PHASE_COLUMNS = [
    ("phase", "phase", "{}"),
    ("epochs", "epochs", "{}"),
    ("train_flops", "training FLOPs", "{:.3e}"),
    ("val_accuracy", "val accuracy after", "{:.4f}"),
]
_RESULT_COLUMNS = [
    ("label", "model", "{}"),
    ("accuracy", "accuracy", "{:.4f}"),
    ("train_flops", "training FLOPs", "{:.3e}"),
    ("flops", "inference FLOPs/sample", "{:,.0f}"),
    ("params", "params", "{:,}"),
]


def _results(ctx: StageContext, name: str, title: str, points: list[dict[str, Any]], split: SplitName) -> list[str]:
    """Record ``points`` and return the result table and an accuracy-against-training-FLOPs plot."""
    ctx.points.extend(points)
    stem = stage_plot_stem(ctx, name)
    trained = [p for p in points if p["train_flops"]]
    lines = [f"Accuracy on the {split} split:", table(points, _RESULT_COLUMNS)]
    if len(trained) > 1:
        plot_accuracy_vs(
            trained,
            ctx.run_dir / "plots" / f"{stem}-train-flops.png",
            x_key="train_flops",
            x_label="training FLOPs executed",
            title=f"{title}: accuracy against training compute",
        )
        lines.append(f"![{title}: accuracy vs training FLOPs](plots/{stem}-train-flops.png)")
    return lines


def _baseline(
    ctx: StageContext,
    trainer: Trainer,
    model: StackModel,
    settings: TrainSettings,
    budget: float,
    name: str,
    objective: torch.nn.Module | None = None,
    epochs: int | None = None,
) -> Phase:
    """Train ``model`` (through ``objective``) end to end for about ``budget`` training FLOPs (or ``epochs``)."""
    n = epochs if epochs is not None else epochs_for_budget(objective or model, ctx.data.train, settings, budget)
    return trainer.run(name, model, settings, n, objective=objective)


@register("stage", "assemble")
def assemble_stage(
    ctx: StageContext,
    /,
    modules: Annotated[int, Field(ge=1)] = 4,
    meta: ModelSpec | None = None,
    meta_epochs: Epochs = 4,
    module_epochs: Annotated[int, Field(ge=1)] = 2,
    settings: Annotated[TrainSettings, Flatten] = DEFAULT_TRAINING,
    baseline: bool = True,
    baseline_epochs: Annotated[int, Field(ge=1)] | None = None,
    split: SplitName = "test",
) -> None:
    """Deep Model Assembling: divide the model into ``modules`` modules, train each inside a shared
    meta model, assemble them and fine-tune for ``epochs``; compare with end-to-end training.

    Args:
        modules: K, the number of modules (contiguous runs of body layers; the stem joins the first,
            the head the last).
        meta: the meta model's spec (default: the variant's model with ``depth: modules``, one layer
            per module, as Deep-Incubation's ``divided_depths 1 1 1 1``).
        meta_epochs: epochs of pre-training the meta model end to end (PT); 0 uses it untrained.
        module_epochs: epochs each module trains in its position of the meta model (MT).
        settings: the training recipe of every phase (lr, batch_size, ...); its ``epochs`` are the
            fine-tuning epochs after assembly (FT).
        baseline: also train a copy of the model from the same initialisation end to end, for about
            the training FLOPs the method spent (or ``baseline_epochs``).
        split: where accuracy and inference FLOPs are measured.
    """
    target = stack_of(ctx.model)
    initial = copy.deepcopy(target)
    spec = _meta_spec(ctx, meta, modules, "assemble")
    trainer = _trainer(ctx)
    result = deep_model_assembling(
        target,
        _build(ctx, spec),
        modules,
        trainer,
        settings,
        meta_epochs=meta_epochs,
        module_epochs=module_epochs,
        finetune_epochs=settings.epochs,
    )
    save_model(ctx.dir / META_STEM, result.meta, model_meta(spec, ctx.data, [], modules=modules, seed=ctx.seed))
    points = [_point(ctx, result.model, f"assembled (K={modules})", split, result.train_flops)]
    if baseline:
        e2e = _baseline(ctx, trainer, initial, settings, result.train_flops, "end-to-end", epochs=baseline_epochs)
        points.append(_point(ctx, initial, f"end-to-end ({len(e2e.history)} epochs)", split, e2e.flops))
        ctx.metrics.update(assemble_e2e_accuracy=points[1]["accuracy"], assemble_e2e_train_flops=e2e.flops)
    pt = [p.flops for p in result.phases if p.name == PRETRAIN]
    points.append(_point(ctx, result.meta, "meta model", split, pt[0] if pt else None))
    ctx.model = result.model
    ctx.structure.append({"op": "assemble", "modules": modules})
    ctx.metrics.update(
        assemble_accuracy=points[0]["accuracy"],
        assemble_train_flops=result.train_flops,
        assemble_incubated_val_accuracy=result.incubated,
    )
    ctx.report.extend(
        [
            f"### Deep Model Assembling (K={modules} modules)",
            f"Meta model {spec.name} ({count_params(result.meta):,} parameters) pre-trained {meta_epochs} epochs; each "
            f"module trained {module_epochs} epochs in its position; assembled and fine-tuned {settings.epochs} "
            "epochs. "
            "Training FLOPs are executed FLOPs of every step (forward, backward). Validation accuracy of the "
            f"assembly before fine-tuning: {_fmt(result.incubated)}.",
            table(_phase_rows(result.phases), _PHASE_COLUMNS),
            *_results(ctx, "assemble", "Deep Model Assembling", points, split),
        ]
    )


@register("stage", "m2mkd")
def m2mkd_stage(
    ctx: StageContext,
    /,
    student: ModelSpec,
    modules: Annotated[int, Field(ge=1)] = 2,
    meta: ModelSpec | None = None,
    adapters: bool = False,
    alpha: Annotated[float, Field(ge=0, le=1)] = 0.5,
    temperature: Annotated[float, Field(gt=0)] = 1.0,
    meta_epochs: Epochs = 4,
    module_epochs: Annotated[int, Field(ge=1)] = 2,
    settings: Annotated[TrainSettings, Flatten] = DEFAULT_TRAINING,
    baselines: bool = True,
    split: SplitName = "test",
) -> None:
    """m2mKD: distil the variant's model (the teacher) module by module into a ``student`` model.

    Args:
        student: the student's model spec (an MoE or nested model); the variant's model becomes it.
        modules: K, modules of teacher and student (contiguous runs of body layers).
        meta: the meta model's spec. Default: the meta model an earlier ``assemble`` stage of this
            variant trained with the same K (m2mKD incubates the teacher's modules in it first, by
            Deep Model Assembling), else the variant's model with ``depth: modules``, pre-trained here
            for ``meta_epochs``.
        adapters: put linear stitch layers at a student module's ends where its width differs from
            the meta model's (dropped on assembly, as the reference code does by default).
        alpha: weight of the distillation term, ``(1 - alpha) * CE + alpha * KD``.
        temperature: KD temperature.
        meta_epochs: epochs of pre-training a meta model built here.
        module_epochs: epochs each student module trains against its teacher module.
        settings: the recipe of every phase; its ``epochs`` are the end-to-end epochs of the assembled student.
        baselines: also train the student from the same initialisation end to end on labels, and by
            plain logit KD from the whole teacher, each for about the training FLOPs m2mKD spent.
        split: where accuracy and inference FLOPs are measured.
    """
    teacher = stack_of(ctx.model)
    s_spec = model_spec(student, "m2mkd.student")
    fresh = _build(ctx, s_spec)
    initial = copy.deepcopy(fresh)
    meta_model = _earlier_meta(ctx, modules) if meta is None else None
    reuse = meta_model is not None
    if meta_model is None:
        meta_model = _build(ctx, _meta_spec(ctx, meta, modules, "m2mkd"))
    trainer = _trainer(ctx)
    result = module_to_module_kd(
        teacher,
        fresh,
        meta_model,
        modules,
        trainer,
        settings,
        meta_epochs=meta_epochs,
        module_epochs=module_epochs,
        finetune_epochs=settings.epochs,
        alpha=alpha,
        temperature=temperature,
        adapters=adapters,
        meta_trained=reuse,
    )
    points = [
        _point(ctx, teacher, "teacher", split, None),
        _point(ctx, result.model, f"m2mKD student (K={modules})", split, result.train_flops),
    ]
    if baselines:
        e2e_model, kd_model = initial, copy.deepcopy(initial)
        e2e = _baseline(ctx, trainer, e2e_model, settings, result.train_flops, "student end-to-end")
        objective = plain_kd(teacher, kd_model, alpha, temperature)
        kd = _baseline(ctx, trainer, kd_model, settings, result.train_flops, "student plain KD", objective)
        points.append(_point(ctx, e2e_model, f"student end-to-end ({len(e2e.history)} epochs)", split, e2e.flops))
        points.append(_point(ctx, kd_model, f"student plain KD ({len(kd.history)} epochs)", split, kd.flops))
        ctx.metrics.update(
            m2mkd_e2e_accuracy=points[2]["accuracy"],
            m2mkd_e2e_train_flops=e2e.flops,
            m2mkd_kd_accuracy=points[3]["accuracy"],
            m2mkd_kd_train_flops=kd.flops,
        )
    ctx.model = result.model
    shape = {"in_shape": list(ctx.data.in_shape), "num_classes": ctx.data.num_classes}
    ctx.structure.append({"op": "m2mkd", "student": s_spec.to_dict(), "modules": modules, **shape})
    ctx.metrics.update(
        teacher_accuracy=points[0]["accuracy"],
        m2mkd_accuracy=points[1]["accuracy"],
        m2mkd_train_flops=result.train_flops,
        m2mkd_incubated_val_accuracy=result.incubated,
    )
    source = (
        "the meta model of the earlier assemble stage"
        if reuse
        else f"a meta model pre-trained {meta_epochs} epochs here"
    )
    ctx.report.extend(
        [
            f"### m2mKD (K={modules} modules, alpha={alpha}, temperature={temperature})",
            f"Teacher: this variant's model; student: {s_spec.name}; meta model: {source}. Each student module "
            f"trained {module_epochs} epochs against its teacher module; the assembled student trained "
            f"{settings.epochs} epochs on labels. Training FLOPs are executed FLOPs of every step (the teacher's "
            "passes included); the teacher's own training is not counted for any student. Validation accuracy "
            f"of the assembled student before end-to-end training: {_fmt(result.incubated)}.",
            table(_phase_rows(result.phases), _PHASE_COLUMNS),
            *_results(ctx, "m2mkd", "m2mKD", points, split),
        ]
    )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
