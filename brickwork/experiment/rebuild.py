"""Replaying the structural changes of a run's stages, so that saved weights load again.

A run's model is built from its config; stages such as ``sparsify`` and ``moefy`` then replace
layers with others of a different structure. Each such stage appends a *recipe* (plain JSON:
``{"op": NAME, ...}``) to ``ctx.structure``; the recipes are saved with the model and the
run's progress. :func:`apply_structure` rebuilds the same skeleton on a freshly built model
(shapes only: partitions, wiring and masks are buffers and come with the weights), which is
what ``--resume`` past such a stage and :func:`~brickwork.experiment.artifacts.load_trained`
do before loading a checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from brickwork.errors import CheckpointError
from brickwork.ops.moefy import moefy_like
from brickwork.ops.sparsify import sparsify_like


def _moefy(model: nn.Module, r: dict[str, Any]) -> nn.Module:
    return moefy_like(model, r["experts"], r["top_k"], r["router"], r.get("layers"))  # type: ignore[arg-type]


def _sparsify(model: nn.Module, r: dict[str, Any]) -> nn.Module:
    return sparsify_like(model, r["layers"])


REBUILDERS: dict[str, Callable[[nn.Module, dict[str, Any]], nn.Module]] = {"moefy": _moefy, "sparsify": _sparsify}


def apply_structure(model: nn.Module, recipes: Sequence[dict[str, Any]]) -> nn.Module:
    """``model`` with the recipes' structural changes applied in order (no weights are set).

    Raises:
        CheckpointError: a recipe names an operation this version cannot rebuild.
    """
    for r in recipes:
        rebuild = REBUILDERS.get(r.get("op", ""))
        if rebuild is None:
            raise CheckpointError(f"cannot rebuild structural change {r.get('op')!r}; known: {sorted(REBUILDERS)}")
        model = rebuild(model, r)
    return model
