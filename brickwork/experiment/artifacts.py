"""Trained models of recorded runs, rebuilt from their saved spec and weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from brickwork.errors import CheckpointError
from brickwork.experiment.config import Spec, validate_args
from brickwork.experiment.pipeline import build_model
from brickwork.experiment.rebuild import apply_structure
from brickwork.experiment.store import RunRecord, RunStore
from brickwork.persist import read_json
from brickwork.registry import REGISTRY
from brickwork.train.checkpoint import load_model


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
    stem = vdir / "model"
    meta = read_json(stem.with_suffix(".json"))
    raw = dict(meta["model"])
    entry = REGISTRY.get("model", raw.pop("name"))
    spec = Spec("model", entry.name, validate_args(entry, raw, f"models.{label}"))
    model = build_model(spec, tuple(meta["data"]["in_shape"]), meta["data"]["num_classes"])
    model = apply_structure(model, meta.get("structure", []))
    load_model(stem, model)
    return TrainedModel(model, spec, label, record, meta, vdir)
