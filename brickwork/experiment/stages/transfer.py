"""The ``transfer`` stage: knowledge transfer between two pretrained models (Roth et al., 2024).

A variant named in ``teacher`` (``{student variant: teacher variant}``) is the student; the
teacher is another variant of the same run, listed earlier under ``models:`` and finished (so two
differently built models, each trained on the labels first). The stage measures the teacher's
complementary knowledge over the student (prediction flips on ``split``), then for each method
of ``methods`` trains a copy of the student from its pretrained weights
(:func:`brickwork.train.distill.transfer.transfer`) and reports what the transfer gave and took:
accuracy, transfer delta, knowledge gain and loss (positive and negative flips against the
student before), and the share of the teacher's complementary samples now right. The variant
continues as it was, or as the student of method ``keep``; a variant that is a teacher of a later
one should not ``keep`` (the later one would learn from the transferred model).

Typical config (a CNN teaching an MLP, the labels-only control beside it)::

    models: {cnn: {name: cnn-tiny}, mlp: {name: mlp-small}}
    stages:
      - {stage: train, epochs: 8, lr: 0.003}
      - {stage: transfer, teacher: {mlp: cnn}, methods: [labels, kl, kl_dp], epochs: 2, lr: 0.0001}
"""

from __future__ import annotations

import copy
from typing import Annotated, Any

import torch
from pydantic import Field

from brickwork.analysis.embedding_eval import encoder_outputs
from brickwork.errors import BrickworkError
from brickwork.experiment.artifacts import earlier_variant
from brickwork.experiment.context import SplitName, StageContext
from brickwork.experiment.report import markdown_table as table
from brickwork.registry import Flatten, register
from brickwork.train.distill.flips import flips, transfer_stats
from brickwork.train.distill.transfer import TransferMethod, teacher_mask, transfer
from brickwork.train.recipe import DEFAULT_TRAINING, TrainSettings

_NAMES = {
    "labels": "labels only (control)",
    "kl": "KL-Dist",
    "xekl": "XE-KL-Dist",
    "kl_dp": "KL-Dist + DP",
    "kl_dp_unsup": "KL-Dist + DP (unsupervised)",
}


@register("stage", "transfer")
def transfer_stage(
    ctx: StageContext,
    /,
    teacher: dict[str, str],
    methods: Annotated[list[TransferMethod], Field(min_length=1)] = ["labels", "kl", "kl_dp"],  # noqa: B006
    temperature: Annotated[float, Field(gt=0)] = 1.0,
    alpha: Annotated[float, Field(ge=0, le=1)] = 0.5,
    keep: TransferMethod | None = None,
    cache: bool = True,
    split: SplitName = "test",
    settings: Annotated[TrainSettings, Flatten] = DEFAULT_TRAINING,
) -> None:
    """Transfer knowledge from variant ``teacher[this variant]`` into this one with each of ``methods``.

    Args:
        teacher: ``{student variant: teacher variant}``; variants not named are left alone.
        methods: transfer methods (:data:`~brickwork.train.distill.transfer.TransferMethod`):
            ``labels`` (the control), ``kl``, ``xekl``, ``kl_dp``, ``kl_dp_unsup``.
        temperature: tau of the KL terms (the paper's ``kd_T`` is 1).
        alpha: weight of the KL in ``xekl`` (cross-entropy ``1 - alpha``).
        keep: continue as the student of this method (one of ``methods``); None keeps the
            pretrained student.
        cache: run the frozen teacher (and the student's initial self) once over the training
            inputs rather than at every step (the same training up to float rounding).
        split: where flips and accuracies are measured.
        settings: the transfer's training (:class:`~brickwork.train.recipe.TrainSettings`,
            flat keys: epochs, lr, optimizer, ...); ``loss`` is the validation loss.
    """
    ref = teacher.get(ctx.label)
    if ref is None:
        return
    if keep is not None and keep not in methods:
        raise BrickworkError(f"transfer: keep={keep!r} is not one of methods {methods}")
    if len(set(methods)) != len(methods):
        raise BrickworkError(f"transfer: methods {methods} name a method twice")
    teacher_model = earlier_variant(ctx, ref, "transfer").model.to(ctx.device).eval()
    data = getattr(ctx.data, split)
    x, y = data.x.to(ctx.device), data.y.cpu()

    def predict(model: torch.nn.Module) -> torch.Tensor:
        return encoder_outputs(model, x, _EVAL_BATCH).argmax(-1).cpu()

    before, taught = predict(ctx.model), predict(teacher_model)
    other = flips(taught, before, y).positive  # what the student knew and the teacher did not
    shares = _partition_shares(ctx, teacher_model)
    rows: list[dict[str, Any]] = []
    kept = None
    for method in methods:
        student = copy.deepcopy(ctx.model)
        torch.manual_seed(ctx.seed)
        transfer(
            student,
            teacher_model,
            ctx.data.train,
            ctx.data.val,
            method,
            settings,
            seed=ctx.seed,
            temperature=temperature,
            alpha=alpha,
            cache=cache,
            device=ctx.device,
            state_path=ctx.stage_path(f"transfer-{method}"),
            progress=ctx.progress,
            desc=f"transfer {ref}->{ctx.label} {method}",
            log_dir=ctx.tensorboard_dir(f"transfer-{method}"),
        )
        stats = transfer_stats(before, predict(student), taught, y).as_dict()
        rows.append({"method": _NAMES[method], **stats})
        ctx.metrics.update({f"transfer_{method}_{k}": stats[k] for k in _METRIC_KEYS})
        if method == keep:
            kept = student
    first = rows[0]
    ctx.metrics.update(
        transfer_teacher_accuracy=first["teacher_accuracy"],
        transfer_student_accuracy=first["accuracy_before"],
        transfer_complementary=first["complementary"],
        transfer_student_only=other,
        **{f"transfer_partition_teacher_share_{k}": v for k, v in shares.items()},
    )
    if kept is not None:
        ctx.model = kept
    ctx.report.extend(_report(ctx, ref, split, settings, temperature, first, other, shares, rows, keep))


_EVAL_BATCH = 512  # measurement only; the training batch size is the settings' batch_size
_METRIC_KEYS = ("accuracy_after", "transfer_delta", "knowledge_gain", "knowledge_loss", "transferred_share")


def _partition_shares(ctx: StageContext, teacher: torch.nn.Module) -> dict[str, float]:
    """Share of the training samples the data partition gives to the teacher (it is fixed: both
    teachers are frozen), by the supervised and the unsupervised rule."""
    train = ctx.data.train
    x = train.x.to(ctx.device)
    t, s = encoder_outputs(teacher, x, _EVAL_BATCH), encoder_outputs(ctx.model, x, _EVAL_BATCH)
    y = train.y.to(ctx.device)
    return {rule: float(teacher_mask(t, s, y, rule).float().mean()) for rule in ("supervised", "unsupervised")}


def _report(
    ctx: StageContext,
    ref: str,
    split: str,
    settings: TrainSettings,
    temperature: float,
    first: dict[str, Any],
    other: float,
    shares: dict[str, float],
    rows: list[dict[str, Any]],
    keep: str | None,
) -> list[str]:
    n = int(first["samples"])
    return [
        f"### Knowledge transfer {ref} -> {ctx.label} (Roth et al., 2024)",
        f"On {n} {split} samples the teacher {ref} has accuracy {first['teacher_accuracy']:.4f}, the student "
        f"{ctx.label} {first['accuracy_before']:.4f}. Complementary knowledge: {first['complementary']:.2%} of the "
        f"samples only the teacher gets right, {other:.2%} only the student. The data partition gives "
        f"{shares['supervised']:.2%} of the training samples to the teacher (supervised; "
        f"{shares['unsupervised']:.2%} unsupervised), the rest to the student's initial self. Each method "
        f"trains a copy of the pretrained student for {settings.epochs} epochs ({settings.optimizer}, lr "
        f"{settings.lr:g}, {settings.schedule}, temperature {temperature:g}). Gain / loss: positive / negative "
        "flips against the student before (loss = what it forgot); transferred: share of the teacher-only "
        "samples the student now gets right."
        + (f" The variant continues as the {keep} student." if keep else " The variant keeps its pretrained weights."),
        table(
            rows,
            [
                ("method", "method", "{}"),
                ("accuracy_after", "accuracy", "{:.4f}"),
                ("transfer_delta", "delta", "{:+.2%}"),
                ("knowledge_gain", "gain (+flips)", "{:.2%}"),
                ("knowledge_loss", "forgot (-flips)", "{:.2%}"),
                ("transferred_share", "transferred", "{:.1%}"),
            ],
        ),
    ]
