"""Training state (model, optimizer, RNG, progress) saved without pickle.

Everything is a tensor in one safetensors file or a plain value in its JSON metadata, so
resuming never unpickles anything and a resumed run on the CPU with a fixed seed ends with
exactly the weights of an uninterrupted run.

Loading trusts nothing it reads: the metadata must be covered by its hash (see
:mod:`brickwork.persist`) and have the expected structure, every tensor must have the dtype
kind the model (or optimizer) expects (no bool or integer weights where floats are), and
parameters and optimizer state must be finite. Each failure is one :class:`CheckpointError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from brickwork._version import __version__
from brickwork.distributed.data_parallel import (
    load_model_state,
    load_optimizer_state,
    main_writes,
    model_state,
    optimizer_state,
    plain_module,
)
from brickwork.errors import CheckpointError
from brickwork.persist import load_tensors, save_tensors

_MODEL, _OPTIM, _RNG = "model.", "optim.", "rng.torch"


def split_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors for safetensors; the rest (modules' ``get_extra_state``, e.g. a schedule's
    progress) must be plain JSON values and goes into the metadata. Nothing is pickled."""
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    extra = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    return tensors, extra


def save_model(stem: str | Path, model: nn.Module, meta: dict[str, Any] | None = None) -> Path:
    """Save ``model``'s state dict (weights, buffers, JSON extra state) with metadata."""
    tensors, extra = split_state(model.state_dict())
    return save_tensors(stem, tensors, {"brickwork": __version__, **(meta or {}), "extra_state": extra})


def load_model(stem: str | Path, model: nn.Module, expect: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Load weights saved by :func:`save_model` into ``model``, strictly; returns the metadata.

    Args:
        stem: the checkpoint's path without suffix.
        model: the model to load into; its state dict says which tensors, shapes and dtypes.
        expect: metadata values the checkpoint must be bound to (e.g. ``{"seed": 0}``).

    Raises:
        CheckpointError: files missing, corrupt or edited; tensors of other names, shapes or
            dtype kinds than the model's; non-finite parameters.
    """
    tensors, meta = load_tensors(stem, expect=expect)
    _load_state(model, {**tensors, **_field(meta, "extra_state", dict, stem, {})}, stem)
    return meta


def _field(meta: Mapping[str, Any], path: str, kind: type, where: object, default: Any = None) -> Any:
    """``meta[key]`` for the last key of dotted ``path`` (the earlier ones name ``meta`` in
    messages); it must be of JSON ``kind``; ``default`` when absent (``None``: required)."""
    key = path.rsplit(".", 1)[-1]
    if key not in meta:
        if default is None:
            raise CheckpointError(f"{where}: the metadata has no {path!r}; not a training checkpoint")
        return default
    value = meta[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        name = {dict: "a JSON object", list: "a list", int: "an integer"}.get(kind, kind.__name__)
        raise CheckpointError(f"{where}: metadata {path}: expected {name}, got {type(value).__name__} {value!r:.60}")
    return value


_KINDS = {"floating": torch.is_floating_point, "complex": torch.is_complex}


def _kind(t: torch.Tensor) -> str:
    """``floating``, ``complex``, ``bool`` or ``integer``: what a load may not change."""
    if t.dtype == torch.bool:
        return "bool"
    return next((name for name, test in _KINDS.items() if test(t)), "integer")


def _check_tensor(name: str, got: torch.Tensor, want: torch.Tensor, finite: bool, where: object) -> None:
    """Refuse ``got`` for ``name`` if its dtype kind differs from ``want``'s or it is not finite.

    Precision may differ (``load_state_dict`` casts float16 to float32); kind may not: a bool
    or integer tensor copied into float weights loads as 0/1 or as truncated values.
    """
    if _kind(got) != _kind(want):
        raise CheckpointError(
            f"{where}: tensor {name!r} has dtype {got.dtype}; expected a {_kind(want)} dtype like {want.dtype}"
        )
    if got.is_floating_point() or got.is_complex():
        bad = torch.isnan(got) if not finite else ~torch.isfinite(got)
        if bad.any():
            i = int(bad.reshape(-1).nonzero()[0, 0])
            what = "NaN" if not finite else "NaN or infinite"
            raise CheckpointError(f"{where}: tensor {name!r} holds a {what} value (flat index {i}); expected finite")


def _load_state(model: nn.Module, state: dict[str, Any], where: object) -> None:
    own = plain_module(model).state_dict()  # a data-parallel model is checked as its plain model
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if isinstance(v, torch.Tensor) and isinstance(state.get(k), torch.Tensor) and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{where}: weights do not match the model (missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatches {shapes[:5]}); was it saved from a different config?"
        )
    params = {name for name, _ in plain_module(model).named_parameters()}
    for k, v in own.items():
        if isinstance(v, torch.Tensor):
            if not isinstance(state[k], torch.Tensor):
                raise CheckpointError(f"{where}: {k!r} is a tensor of the model but not of the checkpoint")
            # Parameters must be finite; a buffer may hold inf on purpose (a threshold), never NaN.
            _check_tensor(k, state[k], v, k in params, where)
    try:
        load_model_state(model, state)  # and into the shards of an FSDP2 model
    except (RuntimeError, TypeError, ValueError, KeyError) as e:  # a module's set_extra_state refusing its JSON
        raise CheckpointError(f"{where}: weights do not load into the model ({str(e).splitlines()[0]})") from None


def save_training_state(
    stem: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    progress: dict[str, Any],
    bind: Mapping[str, Any] | None = None,
) -> None:
    """Save what is needed to continue training bit-for-bit: weights, optimizer, torch RNG.

    ``bind`` (e.g. ``{"seed": 0}``) is stored in the metadata, under its hash, for
    :func:`load_training_state`'s ``expect`` to check.

    A data-parallel model is saved once, by rank 0, in the single-process format: full tensors
    (FSDP2 shards gathered, a collective every rank joins) and integer optimizer ids, so the
    state resumes under any number of processes.
    """
    opt = optimizer_state(model, optimizer)
    model_tensors, extra = split_state(model_state(model))
    tensors = {_MODEL + k: v for k, v in model_tensors.items()}
    plain_state: dict[str, dict[str, Any]] = {}
    for pid, st in opt["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{_OPTIM}{pid}.{k}"] = v
            else:
                plain_state.setdefault(str(pid), {})[k] = v
    tensors[_RNG] = torch.get_rng_state()
    meta = {
        **(bind or {}),
        "brickwork": __version__,
        "progress": progress,
        "extra_state": extra,
        "optimizer": {"param_groups": opt["param_groups"], "plain_state": plain_state},
    }
    with main_writes(model) as main:
        if main:
            save_tensors(stem, tensors, meta)


def load_training_state(
    stem: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, expect: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Restore a state saved by :func:`save_training_state`; returns its ``progress``.

    Args:
        stem: the checkpoint's path without suffix.
        model: loaded strictly (names, shapes, dtype kinds, finite parameters).
        optimizer: loaded from the tensors and the metadata; its state must be finite.
        expect: metadata values the state must be bound to (what ``bind`` stored on save).

    Raises:
        CheckpointError: files missing, corrupt, edited or bound to other values; metadata of
            the wrong structure; tensors that do not fit the model or optimizer.
    """
    tensors, meta = load_tensors(stem, expect=expect)
    progress = _field(meta, "progress", dict, stem)
    _field(progress, "progress.epoch", int, stem)
    _field(progress, "progress.history", list, stem)
    opt_meta = _field(meta, "optimizer", dict, stem)
    groups = _field(opt_meta, "optimizer.param_groups", list, stem)
    plain = _field(opt_meta, "optimizer.plain_state", dict, stem)
    if not all(isinstance(g, dict) for g in groups) or not all(isinstance(v, dict) for v in plain.values()):
        raise CheckpointError(f"{stem}: metadata optimizer: expected param_groups and plain_state of JSON objects")
    if _RNG not in tensors or tensors[_RNG].dtype != torch.uint8:
        raise CheckpointError(f"{stem}: no torch RNG state ({_RNG!r}, uint8); not a training checkpoint")
    state = {k[len(_MODEL) :]: v for k, v in tensors.items() if k.startswith(_MODEL)}
    _load_state(model, {**state, **_field(meta, "extra_state", dict, stem, {})}, stem)
    opt_state: dict[int, dict[str, Any]] = {}
    try:
        for k, v in tensors.items():
            if k.startswith(_OPTIM):
                pid, name = k[len(_OPTIM) :].split(".", 1)
                if v.is_floating_point() and not torch.isfinite(v).all():
                    raise CheckpointError(f"{stem}: optimizer tensor {k!r} holds a NaN or infinite value")
                opt_state.setdefault(int(pid), {})[name] = v
        for pid, st in plain.items():
            opt_state.setdefault(int(pid), {}).update(st)
        load_optimizer_state(model, optimizer, {"state": opt_state, "param_groups": groups})
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
        raise CheckpointError(
            f"{stem}: the saved optimizer state does not match this optimizer ({str(e).splitlines()[0]:.200})"
        ) from None
    try:
        torch.set_rng_state(tensors[_RNG])
    except RuntimeError as e:
        raise CheckpointError(f"{stem}: the saved torch RNG state is invalid ({e})") from None
    return progress
