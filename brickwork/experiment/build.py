"""The one place where a spec or a checkpoint becomes a model.

Three steps, each a small function, used by the pipeline, every verb and every stage:

- :func:`build_model`: a validated model :class:`~brickwork.experiment.config.Spec` plus the
  data's shape gives a freshly initialised model (the registered builder, with ``in_shape`` and
  ``num_classes`` injected where it asks for them);
- :func:`rebuild`: a checkpoint's metadata (``model`` spec, ``data`` shapes, ``structure``
  recipes) gives the same skeleton again. Stages such as ``sparsify`` and ``moefy`` replace
  layers by others of a different structure; each appends a *recipe* (plain JSON,
  ``{"op": NAME, ...}``) to ``ctx.structure``, and :func:`apply_structure` replays them on the
  freshly built model (shapes only: partitions, wiring and masks are buffers and come with the
  weights);
- :func:`load`: :func:`rebuild` plus the checkpoint's weights, loaded strictly (every tensor
  present, every shape equal, the file's hash checked by :func:`brickwork.train.checkpoint.load_model`).

A checkpoint's metadata is written by :func:`model_meta`, so what :func:`rebuild` reads has one
author.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from brickwork.data.base import Dataset
from brickwork.errors import CheckpointError
from brickwork.experiment.config import Spec, validate_args
from brickwork.models.nested import sliced_args
from brickwork.ops.gamma_mod import gamma_mod_like
from brickwork.ops.grow import replay_grow, upcycle_like
from brickwork.ops.layerwise import compose_like, grow_layers_like
from brickwork.ops.moefy import moefy_like
from brickwork.ops.sparsify import sparsify_like
from brickwork.persist import read_meta as read_checkpoint_meta
from brickwork.registry import REGISTRY
from brickwork.train.checkpoint import load_model
from brickwork.train.sema import sema_like

#: A structural recipe as stages record it: ``{"op": NAME, ...}`` (plain JSON).
Recipe = Mapping[str, Any]


def build_model(spec: Spec, in_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Call the model builder of ``spec`` with its arguments and the data's shape.

    Args:
        spec: a validated ``model`` spec (defaults filled in).
        in_shape: per-sample input shape, e.g. (1, 8, 8) or (T,); given to builders that take it.
        num_classes: classes (or vocabulary size); given to builders that take it.
    """
    entry = spec.entry
    injected = {"in_shape": tuple(in_shape), "num_classes": num_classes}
    return entry.obj(**{k: v for k, v in injected.items() if k in entry.injected}, **spec.args)


def model_spec(raw: Mapping[str, Any], where: str = "model") -> Spec:
    """Validate a saved or configured model mapping (``{"name": ..., **args}``) into a spec.

    Raises:
        ConfigError: unknown model name or arguments (``where`` names the key path).
    """
    args = dict(raw)
    entry = REGISTRY.get("model", args.pop("name"), path=f"{where}.name")
    return Spec("model", entry.name, validate_args(entry, args, where))


def variant_spec(run_dir: Path, label: str) -> Spec:
    """The model spec of variant ``label``, from the run's resolved ``config.yaml``."""
    raw = yaml.safe_load((run_dir / "config.yaml").read_text())["models"][label]
    return model_spec(raw, f"models.{label}")


def sliced_spec(spec: Spec, width: float, depth: int, where: str = "model") -> Spec:
    """The spec of the standalone sub-network at ``width`` and ``depth`` of a nested model's spec.

    Raises:
        ValueError: ``spec`` does not name a nested builder.
    """
    return Spec("model", spec.name, validate_args(spec.entry, sliced_args(spec.name, spec.args, width, depth), where))


def _moefy(model: nn.Module, r: Recipe) -> nn.Module:
    return moefy_like(model, r["experts"], r["top_k"], r["router"], r.get("layers"))  # type: ignore[arg-type]


def _sparsify(model: nn.Module, r: Recipe) -> nn.Module:
    return sparsify_like(model, r["layers"])


def _student(model: nn.Module, r: Recipe) -> nn.Module:
    """m2mKD replaced the model by a student of another spec: build that one."""
    return build_model(model_spec(r["student"], "m2mkd.student"), r["in_shape"], r["num_classes"])


#: How each recorded structural change is replayed on a freshly built model.
REBUILDERS: dict[str, Callable[[nn.Module, Recipe], nn.Module]] = {"moefy": _moefy, "sparsify": _sparsify}
REBUILDERS["assemble"] = lambda model, r: model  # Deep Model Assembling keeps the target's structure
REBUILDERS["m2mkd"] = _student
REBUILDERS["grow_layers"] = grow_layers_like  # ops.layerwise: added layers, then LoRA wrappers
REBUILDERS["compose"] = compose_like  # ops.layerwise: the ensemble of specialists around one stem
REBUILDERS["sema"] = sema_like  # train.sema: SEMA layers with their adapters, task heads
REBUILDERS["grow"] = replay_grow  # ops.grow: one function-preserving growth step
REBUILDERS["upcycle"] = upcycle_like  # ops.grow: dense FFNs upcycled into experts
REBUILDERS["gamma_mod"] = gamma_mod_like  # ops.gamma_mod: the chosen layers wrapped in MoD layers


def apply_structure(model: nn.Module, recipes: Sequence[Recipe]) -> nn.Module:
    """``model`` with the recipes' structural changes applied in order (no weights are set).

    Raises:
        CheckpointError: a recipe names an operation this version cannot rebuild.
    """
    for r in recipes:
        replay = REBUILDERS.get(r.get("op", ""))
        if replay is None:
            raise CheckpointError(f"cannot rebuild structural change {r.get('op')!r}; known: {sorted(REBUILDERS)}")
        model = replay(model, r)
    return model


def model_meta(spec: Spec, data: Dataset, structure: Sequence[Recipe] = (), **extra: Any) -> dict[str, Any]:
    """The metadata a checkpoint needs to be rebuilt: the spec, the data's shapes, the recipes.

    ``extra`` keys (metrics, provenance) are stored beside them and ignored by :func:`rebuild`.
    """
    return {
        "model": spec.to_dict(),
        "data": {
            "name": data.name,
            "in_shape": list(data.in_shape),
            "num_classes": data.num_classes,
            **({"preprocess": data.preprocess} if data.preprocess else {}),  # labels, scaling, tokens
        },
        "structure": [dict(r) for r in structure],
        **extra,
    }


def rebuild(meta: Mapping[str, Any], where: str = "model") -> nn.Module:
    """A freshly built model of the checkpoint metadata ``meta``, with its recipes replayed.

    Raises:
        CheckpointError: the metadata lacks the model or data section, or names an unknown recipe.
        ConfigError: the saved spec no longer validates.
    """
    try:
        raw, data = meta["model"], meta["data"]
        in_shape, num_classes = tuple(data["in_shape"]), int(data["num_classes"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint metadata has no model spec and data shapes ({e!r})") from None
    model = build_model(model_spec(raw, where), in_shape, num_classes)
    return apply_structure(model, meta.get("structure", []))


@dataclass
class Checkpoint:
    """A model loaded from a checkpoint, with the spec and metadata it was rebuilt from."""

    model: nn.Module
    spec: Spec
    meta: dict[str, Any]


def read_meta(stem: str | Path) -> dict[str, Any]:
    """The JSON metadata beside checkpoint ``stem`` (``stem.json``).

    Raises:
        CheckpointError: missing or unreadable.
    """
    stem = Path(stem)
    try:
        return read_checkpoint_meta(stem)  # a JSON object, its metadata hash checked before any rebuild
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{stem}: no readable model metadata ({e})") from None


def load(stem: str | Path, meta: Mapping[str, Any] | None = None, where: str = "model") -> Checkpoint:
    """Rebuild the model checkpoint ``stem`` describes and load its weights, verified.

    Args:
        stem: the checkpoint's path without suffix (``stem.safetensors`` + ``stem.json``).
        meta: metadata to rebuild from instead of ``stem.json`` (an older file's, translated).
        where: key path for error messages about the saved spec.

    Raises:
        CheckpointError: metadata or weights missing, corrupt, or not matching the rebuilt model.
    """
    meta = dict(read_meta(stem) if meta is None else meta)
    model = rebuild(meta, where)
    load_model(stem, model)
    return Checkpoint(model, model_spec(meta["model"], where), meta)
