"""Training state (model, optimizer, RNG, progress) saved without pickle.

Everything is a tensor in one safetensors file or a plain value in its JSON metadata, so
resuming never unpickles anything and a resumed run on the CPU with a fixed seed ends with
exactly the weights of an uninterrupted run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from brickwork._version import __version__
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


def load_model(stem: str | Path, model: nn.Module) -> dict[str, Any]:
    """Load weights saved by :func:`save_model` into ``model``, strictly; returns the metadata."""
    tensors, meta = load_tensors(stem)
    _load_state(model, {**tensors, **meta.get("extra_state", {})}, stem)
    return meta


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], where: object) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if isinstance(v, torch.Tensor) and k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{where}: weights do not match the model (missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatches {shapes[:5]}); was it saved from a different config?"
        )
    model.load_state_dict(state)


def save_training_state(
    stem: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, progress: dict[str, Any]
) -> None:
    """Save what is needed to continue training bit-for-bit: weights, optimizer, torch RNG."""
    opt = optimizer.state_dict()
    model_tensors, extra = split_state(model.state_dict())
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
        "brickwork": __version__,
        "progress": progress,
        "extra_state": extra,
        "optimizer": {"param_groups": opt["param_groups"], "plain_state": plain_state},
    }
    save_tensors(stem, tensors, meta)


def load_training_state(stem: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore a state saved by :func:`save_training_state`; returns its ``progress``."""
    tensors, meta = load_tensors(stem)
    state = {k[len(_MODEL) :]: v for k, v in tensors.items() if k.startswith(_MODEL)}
    _load_state(model, {**state, **meta.get("extra_state", {})}, stem)
    opt_state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith(_OPTIM):
            pid, name = k[len(_OPTIM) :].split(".", 1)
            opt_state.setdefault(int(pid), {})[name] = v
    for pid, st in meta["optimizer"]["plain_state"].items():
        opt_state.setdefault(int(pid), {}).update(st)
    optimizer.load_state_dict({"state": opt_state, "param_groups": meta["optimizer"]["param_groups"]})
    torch.set_rng_state(tensors[_RNG])
    return meta["progress"]
