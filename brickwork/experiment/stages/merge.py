"""Stages that combine variants of one run: re-initialise from another seed, align, merge, and
measure linear mode connectivity; and a multi-task merge of one model fine-tuned on two tasks.

A run's variants (the labels under ``models:``) share the stage list and run in config order,
so a stage here names the variants it works with (``to``, ``other``, ``models``): those listed
earlier under ``models:`` are finished and loaded from the run folder; in a variant that is
itself the reference, the stage does nothing (as ``stitch`` does with ``front``). Two variants
of one spec start from one initialisation (the run's seed); ``init_seed`` gives each its own.

Typical LMC config (two MLPs from different seeds, barrier before and after alignment)::

    models: {a: {name: mlp, width: 128}, b: {name: mlp, width: 128}}
    stages:
      - {stage: init_seed, seeds: {b: 1}}
      - {stage: train, epochs: 5}
      - {stage: lmc, other: a, align: [none, weight, activation]}
      - {stage: merge, models: [a], align: weight}
"""

from __future__ import annotations

import copy
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from brickwork.analysis.connectivity import (
    LinearPath,
    evaluate_loss_accuracy,
    linear_path,
    parameter_distance,
    reset_batch_norm,
)
from brickwork.analysis.plots import plot_linear_paths
from brickwork.data import Dataset, load_dataset
from brickwork.data.batching import batches, input_batches
from brickwork.errors import BrickworkError
from brickwork.experiment.artifacts import earlier_variant
from brickwork.experiment.build import build_model, model_meta, variant_spec
from brickwork.experiment.context import SplitName, StageContext
from brickwork.experiment.report import markdown_table as table
from brickwork.experiment.report import stage_plot_stem
from brickwork.nn.stack import StackModel
from brickwork.ops.align import align as align_models
from brickwork.ops.merge import NEEDS_BASE, NEEDS_STATS, MergeMethod, fisher_diagonal, gram_matrices
from brickwork.ops.merge import merge as merge_models
from brickwork.registry import Flatten, register
from brickwork.train.checkpoint import save_model
from brickwork.train.recipe import DEFAULT_TRAINING, TrainSettings, train_with

AlignMethod = Literal["none", "weight", "activation"]
_ALIGN_NAMES = {"none": "naive (no alignment)", "weight": "weight matching", "activation": "activation matching"}


#: A reference variant: one label for every other variant, or ``{variant: reference}`` (only those act).
Reference = str | dict[str, str]


def _reference(ctx: StageContext, ref: Reference) -> str | None:
    """The variant this one is compared with, or None when this stage does nothing here."""
    if isinstance(ref, str):
        return None if ref == ctx.label else ref
    return ref.get(ctx.label)


def _variant(ctx: StageContext, label: str, stage: str) -> nn.Module:
    """The finished model of variant ``label`` of this run (same seed in a repeated-seed run)."""
    return earlier_variant(ctx, label, stage).model.to(ctx.device).eval()


def _aligned(ctx: StageContext, reference: nn.Module, model: nn.Module, method: AlignMethod, samples: int) -> nn.Module:
    """``model`` permuted to match ``reference`` (a copy); ``none`` returns ``model`` itself."""
    if method == "none":
        return model
    batches = None
    if method == "activation":
        batches = list(input_batches(ctx.data.train.x, 256, limit=samples, device=ctx.device))
    aligned, _ = align_models(reference, model, method=method, batches=batches)
    return aligned


@register("stage", "init_seed")
def init_seed(ctx: StageContext, /, seeds: dict[str, Annotated[int, Field(ge=0)]]) -> None:
    """Re-initialise the variants named in ``seeds`` from their own seed (``{label: seed}``).

    The variant's spec is built afresh under ``torch.manual_seed(seed)``; variants not named keep
    the run's initialisation. Use it first, before ``train``, so that two variants of one spec
    start from different initialisations (mode connectivity compares such models). Only the
    initialisation changes: the training batch order follows the run's seed.
    """
    if ctx.label not in seeds:
        return
    torch.manual_seed(seeds[ctx.label])
    spec = variant_spec(ctx.run_dir, ctx.label)
    ctx.model = build_model(spec, ctx.data.in_shape, ctx.data.num_classes).to(ctx.device)
    ctx.metrics["init_seed"] = seeds[ctx.label]


@register("stage", "align")
def align_stage(
    ctx: StageContext,
    /,
    to: Reference,
    method: Literal["weight", "activation"] = "weight",
    samples: Annotated[int, Field(ge=1)] = 1024,
    split: SplitName = "test",
    batch_size: Annotated[int, Field(ge=1)] = 256,
) -> None:
    """Permute this variant's units to match variant ``to`` (git re-basin); the function is unchanged.

    ``weight`` matching (Ainsworth et al., 2023) uses the weights alone; ``activation`` matching
    correlates the two models' activations on ``samples`` training inputs. The variant continues
    as its aligned copy (the same function, reparametrised); the report gives the parameter
    distance to ``to`` before and after, and the largest change of this model's outputs on
    ``split`` (it should be float rounding). ``to`` is one variant (aligned to by every other) or
    ``{variant: reference}``; in a variant with no reference the stage does nothing.
    """
    ref = _reference(ctx, to)
    if ref is None:
        return
    reference = _variant(ctx, ref, "align")
    model = ctx.model.eval()
    aligned = _aligned(ctx, reference, model, method, samples)
    x = getattr(ctx.data, split).x[:batch_size].to(ctx.device)
    with torch.no_grad():
        change = float((aligned.eval()(x) - model(x)).abs().max())
    before, after = parameter_distance(reference, model), parameter_distance(reference, aligned)
    ctx.model = aligned
    ctx.metrics.update(align_distance_before=before, align_distance_after=after, align_max_output_change=change)
    ctx.report.extend(
        [
            f"### {ctx.label} aligned to {ref} ({_ALIGN_NAMES[method]})",
            f"Parameter distance to {ref}: {before:.4g} before, {after:.4g} after; largest change of "
            f"{ctx.label}'s outputs on {len(x)} {split} inputs: {change:.1e}.",
        ]
    )


@register("stage", "lmc")
def lmc(
    ctx: StageContext,
    /,
    other: Reference,
    align: list[AlignMethod] = ["none", "weight", "activation"],  # noqa: B006 (validated config, never mutated)
    points: Annotated[int, Field(ge=2)] = 25,
    split: SplitName = "test",
    batch_size: Annotated[int, Field(ge=1)] = 256,
    samples: Annotated[int, Field(ge=1)] = 1024,
    reset_bn: bool = True,
) -> None:
    """Loss and accuracy along the linear path from variant ``other`` to this one, before and after alignment.

    For each method in ``align`` (``none``: the models as trained; ``weight`` / ``activation``:
    this variant permuted to match ``other`` first), ``points`` evenly spaced models on the
    line are evaluated on ``split`` (:func:`brickwork.analysis.linear_path`); with ``reset_bn``,
    the interior points of models with batch norm have their statistics recomputed on
    ``samples`` training inputs (Jordan et al., 2023). The report gives the loss and accuracy
    barriers (largest loss minus the mean of the ends; mean end accuracy minus the smallest)
    and one figure with every path. This variant itself is not changed. ``other`` is one
    variant (every other variant is compared with it) or ``{variant: reference}`` (pairs, e.g.
    per width); in a variant with no reference the stage does nothing.
    """
    ref = _reference(ctx, other)
    if ref is None:
        return
    reference = _variant(ctx, ref, "lmc")
    model = ctx.model.eval()
    data = getattr(ctx.data, split)
    reset = list(input_batches(ctx.data.train.x, 256, limit=samples, device=ctx.device)) if reset_bn else None
    paths: dict[str, LinearPath] = {}
    rows: list[dict[str, Any]] = []
    for method in dict.fromkeys(align):
        b = _aligned(ctx, reference, model, method, samples)
        p = linear_path(
            reference, b, data, points=points, batch_size=batch_size, device=ctx.device, reset_batches=reset
        )
        paths[_ALIGN_NAMES[method]] = p
        rows.append(p.row(_ALIGN_NAMES[method]))
        ctx.metrics[f"lmc_{method}_loss_barrier"] = p.loss_barrier
        ctx.metrics[f"lmc_{method}_accuracy_barrier"] = p.accuracy_barrier
        ctx.metrics[f"lmc_{method}_midpoint_accuracy"] = p.midpoint_accuracy
    stem = stage_plot_stem(ctx, "lmc")
    plot_linear_paths(paths, ctx.run_dir / "plots" / f"{stem}.png", title=f"{ref} (0) to {ctx.label} (1), {split}")
    bn = next(iter(paths.values())).bn_reset
    ctx.report.extend(
        [
            f"### Linear mode connectivity: {ref} to {ctx.label} ({split})",
            f"{points} points on the line, ends included; loss is cross-entropy (nats). Batch-norm statistics of "
            + ("interior points recomputed on training data." if bn else "the models interpolated (none to reset).")
            + " Barriers: loss max minus the mean of the ends; accuracy mean of the ends minus the min.",
            table(
                rows,
                [
                    ("label", "path", "{}"),
                    ("acc_a", f"acc {ref}", "{:.4f}"),
                    ("acc_b", f"acc {ctx.label}", "{:.4f}"),
                    ("loss_barrier", "loss barrier", "{:.4f}"),
                    ("accuracy_barrier", "accuracy barrier", "{:.4f}"),
                    ("midpoint_accuracy", "acc at midpoint", "{:.4f}"),
                ],
            ),
            f"![Linear paths {ref} to {ctx.label}](plots/{stem}.png)",
        ]
    )


@register("stage", "merge")
def merge_stage(
    ctx: StageContext,
    /,
    models: Annotated[list[str], Field(min_length=1)] | dict[str, Annotated[list[str], Field(min_length=1)]],
    method: MergeMethod = "linear",
    align: AlignMethod = "none",
    base: str | None = None,
    weights: list[float] | None = None,
    options: dict[str, Any] | None = None,
    name: str | None = None,
    adopt: bool = False,
    samples: Annotated[int, Field(ge=1)] = 1024,
    reset_bn: bool = True,
    split: SplitName = "test",
    batch_size: Annotated[int, Field(ge=1)] = 256,
) -> None:
    """Merge this variant with variants ``models`` of this run into a new checkpoint (never an overwrite).

    With ``align`` each of ``models`` is first permuted to match this variant. ``method``,
    ``base`` (a variant label), ``weights`` (one per merged model: this variant first, then
    ``models`` in order) and ``options`` go to :func:`brickwork.ops.merge.merge`. The merged
    model is written to ``<variant>/stage<k>-<name>`` (default ``merged-<method>``), loadable
    with ``experiment.build.load``, and measured on ``split`` beside its inputs. With ``adopt``
    the variant continues as the merged model (later stages such as ``evaluate`` see it); its own
    weights from before are then kept in ``<variant>/stage<k>-before-merge``. ``models`` is one
    list (merged into every variant not in it) or ``{variant: [labels]}`` (only those variants
    act); in a variant named in its own list, or in ``base``, the stage does nothing. With
    ``reset_bn`` the merged model's batch-norm statistics are recomputed on ``samples`` training
    inputs (merged running statistics do not describe the merged network: Jordan et al., 2023).
    """
    labels = models.get(ctx.label, []) if isinstance(models, dict) else models
    if not labels or ctx.label in labels or ctx.label == base:
        return
    others = {label: _variant(ctx, label, "merge") for label in dict.fromkeys(labels)}
    own = ctx.model.eval()
    inputs = {ctx.label: own, **{k: _aligned(ctx, own, m, align, samples) for k, m in others.items()}}
    if weights is not None and len(weights) != len(inputs):
        raise BrickworkError(
            f"merge: weights has {len(weights)} values for {len(inputs)} models ({list(inputs)}); give one each"
        )
    kw: dict[str, Any] = dict(options or {})
    if base is not None:
        kw["base"] = _variant(ctx, base, "merge")
    if weights is not None:
        kw["weights"] = weights
    if method in NEEDS_STATS:  # Fisher / RegMean statistics estimated on training data
        kw["data"] = list(batches(ctx.data.train.x, ctx.data.train.y, 256, limit=samples, device=ctx.device))
    merged = merge_models(list(inputs.values()), method, **kw).to(ctx.device).eval()
    if reset_bn:
        reset_batch_norm(merged, input_batches(ctx.data.train.x, 256, limit=samples, device=ctx.device))
    data = getattr(ctx.data, split)
    rows = []
    for label, m in [*inputs.items(), (f"merged ({method})", merged)]:
        loss, acc = evaluate_loss_accuracy(m, data, batch_size, ctx.device)
        rows.append({"label": label, "accuracy": acc, "loss": loss})
    spec = variant_spec(ctx.run_dir, ctx.label)
    provenance = {
        "method": method,
        "align": align,
        "models": list(inputs),
        "base": base,
        "weights": weights,
        "options": options,
        "bn_reset": reset_bn,
    }
    stem = ctx.stage_path(name or f"merged-{method}")
    save_model(stem, merged, model_meta(spec, ctx.data, ctx.structure, merged_from=provenance, seed=ctx.seed))
    key = name or method
    ctx.metrics[f"merge_{key}_accuracy"] = rows[-1]["accuracy"]
    ctx.metrics[f"merge_{key}_loss"] = rows[-1]["loss"]
    if adopt:
        save_model(ctx.stage_path("before-merge"), own, model_meta(spec, ctx.data, ctx.structure, seed=ctx.seed))
        ctx.model = merged
    ctx.report.extend(
        [
            f"### Merge of {', '.join(inputs)} ({method}, alignment: {_ALIGN_NAMES[align]}, {split})",
            f"Written to `{stem.relative_to(ctx.run_dir)}.safetensors`"
            + (f"; base {base}" if base else "")
            + (f"; weights {weights}" if weights else "")
            + (f"; options {options}" if options else "")
            + ".",
            table(rows, [("label", "model", "{}"), ("accuracy", "accuracy", "{:.4f}"), ("loss", "loss", "{:.4f}")]),
        ]
    )


@register("stage", "task_merge")
def task_merge(
    ctx: StageContext,
    /,
    other_data: dict[str, Any],
    methods: Annotated[list[MergeMethod], Field(min_length=1)] = ["task_arithmetic", "ties"],  # noqa: B006
    options: dict[str, dict[str, Any]] | None = None,
    training: Annotated[TrainSettings, Flatten] = DEFAULT_TRAINING,
    samples: Annotated[int, Field(ge=1)] = 512,
    split: SplitName = "test",
    eval_batch_size: Annotated[int, Field(ge=1)] = 256,
) -> None:
    """Multi-task merging: this model fine-tuned on two tasks (separate heads), the bodies merged.

    The variant's model as it stands is the shared start (the "pre-trained" base). It is
    fine-tuned (``training``: the ``train`` stage's keys) once on this run's data and once on
    ``other_data`` (a dataset spec such as ``{name: fashion-mnist, limit_train: 10000}``, same
    input shape), each copy with its own head. The two fine-tuned models are merged with each of
    ``methods`` (``base``: the start; ``options``: per method, e.g. ``{ties: {density: 0.2}}``;
    Fisher / RegMean statistics from ``samples`` training rows of each model's own task); every
    task is then evaluated with the merged stem and body and that task's own fine-tuned head.
    Reported: each task's accuracy normalised to its fine-tuned model, and their mean (Ilharco
    et al., 2023). The variant's own model is not changed.
    """
    model = ctx.model
    if not isinstance(model, StackModel):
        raise BrickworkError(f"task_merge: needs a stack model with a head, not {type(model).__name__}")
    raw = dict(other_data)
    if "name" not in raw:
        raise BrickworkError("task_merge: other_data needs a dataset name, e.g. {name: fashion-mnist}")
    other = load_dataset(raw.pop("name"), seed=ctx.seed, **raw)
    if tuple(other.in_shape) != tuple(ctx.data.in_shape) or other.num_classes != ctx.data.num_classes:
        raise BrickworkError(
            f"task_merge: {other.name} has inputs {tuple(other.in_shape)} and {other.num_classes} classes, "
            f"{ctx.data.name} {tuple(ctx.data.in_shape)} and {ctx.data.num_classes}; expected the same"
        )
    tasks = {ctx.data.name: ctx.data, (other.name if other.name != ctx.data.name else f"{other.name}-2"): other}
    base = copy.deepcopy(model).eval()
    tuned: dict[str, StackModel] = {}
    for name, data in tasks.items():
        ft = copy.deepcopy(base)
        torch.manual_seed(ctx.seed)
        train_with(
            ft,
            data.train,
            data.val,
            training,
            seed=ctx.seed,
            device=ctx.device,
            state_path=ctx.stage_path(f"finetune-{name}"),
            progress=ctx.progress,
            desc=f"fine-tune on {name}",
            log_dir=ctx.tensorboard_dir(f"finetune-{name}"),
        )
        tuned[name] = ft.eval()
    own = {
        n: evaluate_loss_accuracy(m, getattr(tasks[n], split), eval_batch_size, ctx.device)[1] for n, m in tuned.items()
    }
    rows: list[dict[str, Any]] = [{"method": "fine-tuned (each its own)", **{f"acc_{n}": a for n, a in own.items()}}]
    for method in dict.fromkeys(methods):
        kw: dict[str, Any] = dict((options or {}).get(method, {}))
        if method in NEEDS_BASE:
            kw["base"] = base
        if method == "fisher":
            kw["statistics"] = [fisher_diagonal(tuned[n], _task_batches(tasks[n], samples, ctx.device)) for n in tasks]
        elif method == "regmean":
            kw["statistics"] = [gram_matrices(tuned[n], _task_batches(tasks[n], samples, ctx.device)) for n in tasks]
        merged = merge_models(list(tuned.values()), method, **kw)
        row: dict[str, Any] = {"method": method}
        for n, data in tasks.items():
            m = copy.deepcopy(merged)
            m.head = copy.deepcopy(tuned[n].head)  # the task's own head on the merged stem and body
            row[f"acc_{n}"] = evaluate_loss_accuracy(m, getattr(data, split), eval_batch_size, ctx.device)[1]
            row[f"norm_{n}"] = row[f"acc_{n}"] / own[n]
            ctx.metrics[f"task_merge_{method}_normalised_{n}"] = row[f"norm_{n}"]
        row["norm_mean"] = sum(row[f"norm_{n}"] for n in tasks) / len(tasks)
        ctx.metrics[f"task_merge_{method}_normalised_mean"] = row["norm_mean"]
        rows.append(row)
    names = list(tasks)
    ctx.report.extend(
        [
            f"### Multi-task merge: fine-tuned on {' and '.join(names)}, bodies merged ({split})",
            f"Both fine-tuned from {ctx.label} as it stood ({training.epochs} epoch(s), lr {training.lr}), each with "
            "its own head; each task evaluated with the merged stem and body and its own head. `norm`: accuracy "
            "divided by that task's fine-tuned model's.",
            table(
                rows,
                [
                    ("method", "method", "{}"),
                    *[(f"acc_{n}", f"acc {n}", "{:.4f}") for n in names],
                    *[(f"norm_{n}", f"norm {n}", "{:.3f}") for n in names],
                    ("norm_mean", "mean norm", "{:.3f}"),
                ],
            ),
        ]
    )


def _task_batches(data: Dataset, samples: int, device: str) -> list[tuple[Tensor, Tensor]]:
    return list(batches(data.train.x, data.train.y, 64, limit=samples, device=device))
