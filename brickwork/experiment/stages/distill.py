"""The ``distill`` stage: train the variant against a frozen teacher with named loss terms over taps.

One stage trains every variant of the run with one recipe (:class:`TrainSettings`): a variant
named under ``students`` is trained by its terms (logit KD, hints, attention, RKD, DIST, ...;
``brickwork ls distill_loss``) against the teacher; every other variant (the teacher variant
itself, the label-only baselines) is trained on the labels alone, so the comparison is at
equal recipe. Training is the ordinary loop (``train.recipe.train_with``) on a
:class:`~brickwork.train.distill.Distiller`; nothing here trains by itself.

The teacher comes from anywhere (exactly one key of ``teacher:``):

- ``variant: LABEL``: a variant of this run listed earlier under ``models:`` (its final model,
  the same seed in a repeated-seed run), e.g. a CNN trained by this same stage;
- ``current: true``: this variant's own model as its earlier stages left it; the student is then
  the variant's architecture re-initialised (born-again distillation, Furlanello et al., 2018);
- ``run: ID`` (with ``model:`` and ``seed:`` where the run has several): a run of the store;
- ``checkpoint: PATH``: a brickwork checkpoint stem (``PATH.safetensors`` + ``PATH.json``);
- ``pretrained: minilm-l6``: a registered pretrained model;
- ``bert: DIR``: a local Hugging Face BERT / RoBERTa folder (:mod:`brickwork.models.bert`).

Multi-stage pipelines are stage lists: ``distill`` (train the teacher variant, distil the
students), then ``train`` again to fine-tune on labels, then ``evaluate``.

Example::

    models: {cnn: {name: cnn-tiny}, mlp: {name: mlp-small}, mlp-kd: {name: mlp-small}}
    stages:
      - stage: distill
        teacher: {variant: cnn}
        losses: {kd: {loss: logit_kd, args: {temperature: 4, alpha: 0.1, beta: 0.9}}}
        students: {mlp-kd: [kd]}
        epochs: 8
      - {stage: evaluate}
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
import torch
from pydantic.dataclasses import dataclass
from torch import nn

from brickwork.data.base import Split
from brickwork.errors import BrickworkError
from brickwork.experiment.artifacts import earlier_variant, load_trained
from brickwork.experiment.build import apply_structure, build_model, load, variant_spec
from brickwork.experiment.context import StageContext
from brickwork.experiment.report import markdown_table
from brickwork.experiment.store import RunStore
from brickwork.models.bert import load_bert
from brickwork.persist import canonical_json
from brickwork.registry import REGISTRY, Flatten, register
from brickwork.train import build_loss, evaluate
from brickwork.train.distill import Distiller, Term, build_cache, frozen_teacher
from brickwork.train.distill.cache import cache_binding
from brickwork.train.distill.objective import teacher_taps
from brickwork.train.recipe import DEFAULT_TRAINING, TrainSettings, train_with

CacheMode = Literal["none", "memory", "file"]
Pretrained = Literal["minilm-l6"]


@dataclass(frozen=True, config=pydantic.ConfigDict(extra="forbid"))
class TeacherRef:
    """Where the teacher comes from: exactly one of ``variant``, ``current``, ``run``, ``checkpoint``,
    ``pretrained``, ``bert``.

    Attributes:
        variant: a variant of this run listed earlier under ``models:``.
        current: this variant's model as its earlier stages left it (the student is re-initialised).
        run: a run of the store (id or name); ``model`` names its variant, ``seed`` its seed.
        checkpoint: a brickwork checkpoint stem (``.safetensors`` and ``.json`` beside each other).
        pretrained: a registered pretrained model.
        bert: a local Hugging Face BERT-family folder (config.json, model.safetensors, tokenizer.json).
    """

    variant: str | None = None
    current: bool = False
    run: str | None = None
    model: str | None = None
    seed: int | None = None
    checkpoint: str | None = None
    pretrained: Pretrained | None = None
    bert: str | None = None

    def __post_init__(self) -> None:
        given = [k for k in ("variant", "run", "checkpoint", "pretrained", "bert") if getattr(self, k) is not None]
        given += ["current"] if self.current else []
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of variant, current, run, checkpoint, pretrained, bert (got {given or 'none'})"
            )
        if (self.model is not None or self.seed is not None) and self.run is None:
            raise ValueError("model and seed pick a variant of a run; give them with run")
        if self.bert is not None and not Path(self.bert, "config.json").is_file():
            raise ValueError(f"bert {self.bert!r}: no config.json there (expected a Hugging Face model folder)")
        if self.checkpoint is not None:
            stem = self.checkpoint.removesuffix(".safetensors").removesuffix(".json")
            if not Path(f"{stem}.json").is_file():
                raise ValueError(
                    f"checkpoint {stem!r}: no {stem}.json (a brickwork checkpoint is NAME.safetensors + NAME.json)"
                )

    def describe(self) -> str:
        if self.variant is not None:
            return f"variant {self.variant}"
        if self.current:
            return "this variant after its earlier stages"
        if self.run is not None:
            return (
                f"run {self.run}"
                + (f" model {self.model}" if self.model else "")
                + (f" seed {self.seed}" if self.seed is not None else "")
            )
        if self.bert is not None:
            return f"BERT folder {self.bert}"
        return f"checkpoint {self.checkpoint}" if self.checkpoint is not None else f"pretrained {self.pretrained}"


def _teacher(ctx: StageContext, ref: TeacherRef) -> nn.Module:
    """The teacher model ``ref`` names, frozen, on the run's device."""
    if ref.variant is not None:
        model = earlier_variant(ctx, ref.variant, "distill").model
    elif ref.current:
        model = ctx.model
    elif ref.run is not None:
        model = load_trained(RunStore(ctx.run_dir.parent), ref.run, ref.model, seed=ref.seed).model
    elif ref.checkpoint is not None:
        model = load(
            ref.checkpoint.removesuffix(".safetensors").removesuffix(".json"), where="teacher.checkpoint"
        ).model
    elif ref.bert is not None:
        model = load_bert(ref.bert)
    else:
        model = REGISTRY.get("model", str(ref.pretrained), path="teacher.pretrained").obj()
    return frozen_teacher(model.to(ctx.device))


def _fresh_student(ctx: StageContext) -> nn.Module:
    """This variant's architecture (and structural recipes), newly initialised, for ``current: true``."""
    torch.manual_seed(ctx.seed + 1)  # another initialisation than the teacher's own
    spec = variant_spec(ctx.run_dir, ctx.label)
    model = build_model(spec, ctx.data.in_shape, ctx.data.num_classes)
    return apply_structure(model, ctx.structure).to(ctx.device)


def _terms_of(ctx: StageContext, losses: dict[str, Term], students: dict[str, list[str]] | None) -> dict[str, Term]:
    """The terms variant ``ctx.label`` is distilled with (empty: it trains on labels)."""
    if students is None:
        return dict(losses)
    for label, names in students.items():
        for name in names:
            if name not in losses:
                raise BrickworkError(f"distill: students.{label} names loss {name!r}; losses has {sorted(losses)}")
    return {name: losses[name] for name in students.get(ctx.label, [])}


def _cache(ctx: StageContext, teacher: nn.Module, terms: dict[str, Term], mode: CacheMode) -> Any:
    """The teacher's tensors on the training split, computed once (shared by a run's students in a file)."""
    if mode == "none":
        return None
    taps = teacher_taps(terms)
    x = ctx.data.train.x
    file = None
    if mode == "file":
        key = hashlib.sha256(canonical_json(cache_binding(teacher, taps, x))).hexdigest()
        file = ctx.run_dir / "teacher-cache" / key[:20]
    return build_cache(teacher, taps, x, device=ctx.device, file=file)


@register("stage", "distill")
def distill(
    ctx: StageContext,
    /,
    teacher: TeacherRef,
    losses: dict[str, Term],
    students: dict[str, list[str]] | None = None,
    cache: CacheMode = "memory",
    settings: Annotated[TrainSettings, Flatten] = DEFAULT_TRAINING,
) -> None:
    """Distil a frozen teacher into the students; every other variant trains on labels with the same recipe.

    Args:
        teacher: where the teacher comes from (:class:`TeacherRef`).
        losses: named terms (:class:`~brickwork.train.distill.Term`: ``loss``, ``weight``,
            ``args``, ``student``/``teacher`` module paths, ``*_io``, ``adapter``).
        students: variant -> the names of its terms; variants not listed train on labels.
            Default: every variant but the teacher variant is a student of every term.
        cache: the teacher's tensors computed once, in ``memory`` or in a ``file`` under the run
            folder (shared by the run's students); ``none`` runs the teacher every step.
        settings: the recipe (:class:`~brickwork.train.recipe.TrainSettings`, flat keys).
    """
    terms = _terms_of(ctx, losses, students)
    if ctx.label == teacher.variant:
        terms = {}
    torch.manual_seed(ctx.seed)
    t0 = time.perf_counter()
    desc = f"distill {ctx.label}"
    if not terms:  # the teacher variant and label-only baselines: the train stage's recipe
        history = train_with(
            ctx.model, ctx.data.train, ctx.data.val, settings, seed=ctx.seed, aux_weights=ctx.aux_weights,
            device=ctx.device, state_path=ctx.stage_path("train_state"), progress=ctx.progress, desc=desc,
            log_dir=ctx.tensorboard_dir("labels"),
        )  # fmt: skip
        _record(ctx, history, t0, ["labels only (cross-entropy)"])
        return
    model = _teacher(ctx, teacher)
    student = _fresh_student(ctx) if teacher.current else ctx.model
    x, y = ctx.data.train.x, ctx.data.train.y
    distiller = Distiller(
        student, model, terms, y.to(ctx.device), x[:8].to(ctx.device), cache=_cache(ctx, model, terms, cache)
    )
    history = train_with(
        distiller, Split(x, torch.arange(len(x))), ctx.data.val, settings, seed=ctx.seed,
        aux_weights=ctx.aux_weights, device=ctx.device, state_path=ctx.stage_path("distill_state"),
        progress=ctx.progress, desc=desc, log_dir=ctx.tensorboard_dir("distill"),
    )  # fmt: skip
    ctx.model = student
    teacher_val = evaluate(model, ctx.data.val, build_loss(settings.loss), device=ctx.device)
    ctx.metrics["teacher_val_accuracy"] = teacher_val["accuracy"]
    rows = [
        {
            "name": n,
            "loss": t.loss,
            "weight": t.weight,
            "args": t.args or "",
            "taps": _taps_text(t),
            "adapter": t.adapter,
        }
        for n, t in terms.items()
    ]
    cols = [("name", "term", "{}"), ("loss", "loss", "{}"), ("weight", "weight", "{:g}"), ("args", "arguments", "{}"),
            ("taps", "student -> teacher", "{}"), ("adapter", "adapter", "{}")]  # fmt: skip
    summary = (
        f"Distilled from {teacher.describe()} (teacher val accuracy {teacher_val['accuracy']:.4f}), "
        f"teacher cache: {cache}; student val accuracy {history[-1].get('val_accuracy', float('nan')):.4f}."
    )
    _record(ctx, history, t0, [summary, markdown_table(rows, cols)])


def _taps_text(t: Term) -> str:
    if t.loss == "labels":
        return "labels"
    return f"{t.student or '<output>'}:{t.student_io} -> {t.teacher or '<output>'}:{t.teacher_io}"


def _record(ctx: StageContext, history: list[dict[str, Any]], t0: float, report: list[str]) -> None:
    ctx.history.extend(history)
    ctx.metrics["train_seconds"] = sum(r["seconds"] for r in history)
    ctx.metrics["distill_wall_seconds_this_process"] = time.perf_counter() - t0
    if history and "val_accuracy" in history[-1]:
        ctx.metrics["val_accuracy"] = history[-1]["val_accuracy"]
    ctx.report.extend(["### distill", *report])
