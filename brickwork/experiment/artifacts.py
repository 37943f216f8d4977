"""Trained models of recorded runs: a lookup of the variant's folder, loaded by :mod:`~brickwork.experiment.build`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from brickwork.errors import BrickworkError, CheckpointError
from brickwork.experiment.build import load
from brickwork.experiment.config import Spec
from brickwork.experiment.context import StageContext
from brickwork.experiment.store import RunRecord, RunStore


@dataclass
class TrainedModel:
    """A model variant of a run, with what it was built from."""

    model: nn.Module
    spec: Spec
    label: str
    record: RunRecord
    meta: dict[str, Any]
    dir: Path


def load_trained(store: RunStore, ref: str, label: str | None = None, seed: int | None = None) -> TrainedModel:
    """Rebuild variant ``label`` (default: the only one) of run ``ref`` and load its weights.

    For a run over several seeds, ``seed`` picks one (default: the first).

    Raises:
        RunNotFoundError: no such run.
        CheckpointError: no such variant, or its weights are missing or corrupt.
    """
    record = store.get(ref)
    labels = list(record.config.get("models", {}))
    if label is None:
        if len(labels) != 1:
            raise CheckpointError(f"run {record.id} has models {labels}; name one with --model")
        label = labels[0]
    if label not in labels:
        raise CheckpointError(f"run {record.id} has no model {label!r}; it has {labels}")
    seeds = record.config.get("seeds")
    if seeds and seed is None:
        seed = seeds[0]
    if seeds and seed not in seeds:
        raise CheckpointError(f"run {record.id} has seeds {seeds}, not {seed}")
    vdir = record.dir / label / f"seed-{seed}" if seeds else record.dir / label
    ckpt = load(vdir / "model", where=f"models.{label}")
    return TrainedModel(ckpt.model, ckpt.spec, label, record, ckpt.meta, vdir)


def earlier_variant(ctx: StageContext, label: str, stage: str) -> TrainedModel:
    """Variant ``label`` of the run ``ctx`` is in, finished earlier (the same seed in a repeated-seed run).

    Raises:
        BrickworkError: ``label`` is the variant running now, or it cannot be loaded (not
            listed before it under ``models:``, or not trained yet): one line naming ``stage``.
    """
    if label == ctx.label:
        raise BrickworkError(f"{stage}: variant {label!r} names itself; name another variant of this run")
    try:
        return load_trained(
            RunStore(ctx.run_dir.parent),
            ctx.run_dir.name,
            label,
            seed=ctx.seed if ctx.dir.name.startswith("seed-") else None,
        )
    except BrickworkError as e:
        raise BrickworkError(
            f"{stage}: cannot load variant {label!r} of this run ({e}); list it before {ctx.label!r} under models:"
        ) from None
