"""Stages that combine variants of one run: re-initialise from another seed, align, merge, and
measure linear mode connectivity (the multi-task merge is ``stages/task_merge.py``).

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

from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from torch import nn

from brickwork.analysis.connectivity import (
    LinearPath,
    evaluate_loss_accuracy,
    linear_path,
    parameter_distance,
    reset_batch_norm,
)
from brickwork.analysis.plots import plot_linear_paths
from brickwork.data.batching import batches, input_batches
from brickwork.errors import BrickworkError
from brickwork.experiment.artifacts import earlier_variant
from brickwork.experiment.build import build_model, model_meta, variant_spec
from brickwork.experiment.context import SplitName, StageContext
from brickwork.experiment.report import markdown_table as table
from brickwork.experiment.report import stage_plot_stem
from brickwork.ops.align import align as align_models
from brickwork.ops.merge import NEEDS_STATS, MergeMethod
from brickwork.ops.merge import merge as merge_models
from brickwork.registry import register
from brickwork.train.checkpoint import save_model

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
def init_seed(ctx: StageContext, /, seeds: dict[str, Annotated[int, Field(ge=0)]], relative: bool = False) -> None:
    """Re-initialise the variants named in ``seeds`` from their own seed (``{label: seed}``).

    The variant's spec is built afresh under ``torch.manual_seed(seed)``; variants not named keep
    the run's initialisation. Use it first, before ``train``, so that two variants of one spec
    start from different initialisations (mode connectivity compares such models). Only the
    initialisation changes: the training batch order follows the run's seed.

    With ``relative`` each seed is an offset added to the run's seed, so a config repeated over
    ``seeds: [0, 1, 2]`` with ``{b: 100}`` compares the pairs (0, 100), (1, 101), (2, 102). Without
    it, b's seed is the same in every repetition, and the repetition whose run seed equals it
    would compare two identical initialisations.
    """
    if ctx.label not in seeds:
        return
    seed = seeds[ctx.label] + (ctx.seed if relative else 0)
    torch.manual_seed(seed)
    spec = variant_spec(ctx.run_dir, ctx.label)
    ctx.model = build_model(spec, ctx.data.in_shape, ctx.data.num_classes).to(ctx.device)
    ctx.metrics["init_seed"] = seed


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
