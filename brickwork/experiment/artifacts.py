"""Trained models of recorded runs: a lookup of the variant's folder, loaded by :mod:`~brickwork.experiment.build`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from brickwork.errors import CheckpointError
from brickwork.experiment.build import load
from brickwork.experiment.config import Spec
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
