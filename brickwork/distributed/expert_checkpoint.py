"""Per-rank checkpoints of an expert-parallel model that reload into any expert-parallel degree.

Layout: a folder of ``experts-{p}-of-{P}.safetensors`` (+ ``.json``) shards, written with
:func:`brickwork.persist.save_tensors` (atomic, hashed). Shard ``p`` holds the experts of EP
rank ``p`` (only the ranks with dp index 0 write: the dp replicas hold the same experts) under
their **single-process** names: a stacked bank's ``...experts.w_in`` is the slice ``[start,
stop)`` of the full (E, ...) tensor, recorded in the shard's metadata; a list bank's experts are
renamed to their global index (``...experts.5.weight``). Shard 0 also holds every replicated
tensor. The union of the shards is therefore the single-process state dict: a one-process load
is a plain ``load_state_dict``, and a load into P' ranks takes each rank's slice of it. Each
shard holding its own rank's experts, and none another's, is what megablocks #160 and
DeepSpeed #6589 got wrong (every rank saved or loaded the same experts).

A load reads every shard (verified), so it holds the full model in memory for a moment; that
is fine at the sizes a CPU run trains and keeps the format one obvious thing.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from brickwork.distributed.expert_parallel import ExpertParallelGroups, ExpertParallelMoE
from brickwork.errors import CheckpointError
from brickwork.nn.routing import ExpertList
from brickwork.persist import load_tensors, save_tensors

_SHARD = re.compile(r"experts-(\d{3})-of-(\d{3})\.json")
KIND = "expert_parallel_shard"
OPTIM = "optim."  # prefix of optimizer-state tensors: optim.{state key}/{parameter name}


def _expert_keys(model: nn.Module) -> dict[str, tuple[str, tuple[int, int, int] | None]]:
    """Local state-dict key of every expert tensor -> (its single-process key, its slice of dim 0 or None)."""
    out: dict[str, tuple[str, tuple[int, int, int] | None]] = {}
    for path, module in model.named_modules():
        if not isinstance(module, ExpertParallelMoE):
            continue
        prefix = f"{path}.experts." if path else "experts."
        start, stop = module.expert_offset, module.expert_offset + module.local_experts
        for key in module.experts.state_dict():
            local = prefix + key
            if isinstance(module.experts, ExpertList):  # "j.rest" -> "(offset + j).rest"
                j, _, rest = key.partition(".")
                out[local] = (f"{prefix}{start + int(j)}.{rest}", None)
            else:
                out[local] = (local, (start, stop, module.num_experts))
    return out


def save_expert_shards(
    folder: str | Path, model: nn.Module, groups: ExpertParallelGroups, optimizer: torch.optim.Optimizer | None = None
) -> Path | None:
    """Write this rank's shard (ranks with dp index 0 only); every rank waits until all are written.

    Args:
        folder: where the shards go.
        model: the expert-parallel model (or one without MoE: then shard 0 holds everything).
        groups: its process groups.
        optimizer: also save its per-parameter state (Adam's moments and step), named
            ``optim.{key}/{parameter}`` and sharded like the parameter, so training resumes on any
            EP degree (the optimizer's hyperparameters come from the config, not the file).

    Returns:
        The shard's ``.safetensors`` path, or None on a rank that writes nothing.
    """
    folder = Path(folder)
    writes = groups.dp is None or dist.get_rank(groups.dp) == 0
    path = None
    if writes:
        keys = _expert_keys(model)
        tensors: dict[str, Tensor] = {}
        slices: dict[str, list[int]] = {}
        for local, value in model.state_dict().items():
            if local in keys:
                name, sl = keys[local]
                tensors[name] = value
                if sl is not None:
                    slices[name] = list(sl)
            elif groups.ep_rank == 0:
                tensors[local] = value
        if optimizer is not None:
            _optimizer_tensors(model, optimizer, keys, groups.ep_rank, tensors, slices)
        p, size = groups.ep_rank, groups.ep_size
        meta = {"kind": KIND, "shard": p, "shards": size, "slices": slices}
        path = save_tensors(folder / f"experts-{p:03d}-of-{size:03d}", tensors, meta)
    dist.barrier(group=groups.world)
    return path


def _optimizer_tensors(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    keys: dict[str, tuple[str, tuple[int, int, int] | None]],
    ep_rank: int,
    tensors: dict[str, Tensor],
    slices: dict[str, list[int]],
) -> None:
    """Add the optimizer's state of the parameters this shard holds, named like them."""
    names = {id(p): n for n, p in model.named_parameters()}
    for param, state in optimizer.state.items():
        local = names[id(param)]
        name, sl = keys.get(local, (local, None))
        for k, v in state.items():
            if not isinstance(v, Tensor):
                raise CheckpointError(f"optimizer state {k!r} of {local} is not a tensor; cannot shard it")
            key = f"{OPTIM}{k}/{name}"
            shaped = sl is not None and v.shape == param.shape  # a moment: sliced like its parameter
            if local not in keys or (sl is not None and not shaped):
                if ep_rank != 0:  # replicated (or a stacked bank's scalar step): shard 0 holds it
                    continue
            elif shaped:
                slices[key] = list(sl)  # type: ignore[arg-type]
            tensors[key] = v


def read_expert_shards(folder: str | Path) -> dict[str, Tensor]:
    """The single-process state dict assembled from all shards of ``folder`` (each one verified).

    Raises:
        CheckpointError: no shards, shards of different counts, a missing shard, or expert slices
            that do not cover every expert exactly once.
    """
    folder = Path(folder)
    found = sorted(
        (int(m[1]), int(m[2])) for f in folder.glob("experts-*-of-*.json") if (m := _SHARD.fullmatch(f.name))
    )
    if not found:
        raise CheckpointError(f"{folder}: no expert-parallel shards (experts-NNN-of-NNN.safetensors) found")
    sizes = {n for _, n in found}
    shards = [p for p, _ in found]
    if len(sizes) != 1 or shards != list(range(next(iter(sizes)))):
        raise CheckpointError(f"{folder}: expected shards 0..P-1 of one P, found {[f'{p} of {n}' for p, n in found]}")
    size = next(iter(sizes))
    state: dict[str, Tensor] = {}
    pieces: dict[str, list[tuple[int, int, int, Tensor]]] = {}
    for p in range(size):
        tensors, meta = load_tensors(folder / f"experts-{p:03d}-of-{size:03d}", expect={"kind": KIND, "shard": p})
        for name, value in tensors.items():
            sl = meta["slices"].get(name)
            if sl is None:
                state[name] = value
            else:
                pieces.setdefault(name, []).append((sl[0], sl[1], sl[2], value))
    for name, parts in pieces.items():
        parts.sort(key=lambda t: t[0])
        ends = [(a, b) for a, b, _, _ in parts]
        total = parts[0][2]
        if [a for a, _ in ends] != [0] + [b for _, b in ends[:-1]] or ends[-1][1] != total:
            raise CheckpointError(f"{folder}: {name}: expert slices {ends} do not cover experts 0..{total - 1} once")
        state[name] = torch.cat([t for _, _, _, t in parts])
    return state


def load_expert_shards(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load a sharded checkpoint into ``model``: a single-process model, or an expert-parallel one of any degree.

    Args:
        folder: the shards' folder.
        model: the model to fill (its own slice of every expert tensor is taken).
        optimizer: an optimizer over ``model``'s parameters whose state is restored from the
            checkpoint's ``optim.*`` tensors (saved with ``save_expert_shards(..., optimizer)``).

    Raises:
        CheckpointError: as :func:`read_expert_shards`, or tensors the model does not have / lacks,
            or an optimizer asked for and no optimizer state saved.
    """
    everything = read_expert_shards(folder)
    full = {k: v for k, v in everything.items() if not k.startswith(OPTIM)}
    keys = _expert_keys(model)
    local: dict[str, Any] = {}
    missing = []
    for key in model.state_dict():
        name, sl = keys.get(key, (key, None))
        if name not in full:
            missing.append(name)
            continue
        local[key] = full[name] if sl is None else full[name][sl[0] : sl[1]]
    # Other ranks' experts of a list bank are in the checkpoint but not in this rank's model.
    sharded = tuple(
        f"{path}.experts." if path else "experts."
        for path, m in model.named_modules()
        if isinstance(m, ExpertParallelMoE)
    )
    mapped = {keys.get(k, (k, None))[0] for k in model.state_dict()}
    extra = {n for n in full if n not in mapped and not (sharded and n.startswith(sharded))}
    if missing or extra:
        raise CheckpointError(
            f"{folder}: the checkpoint does not fit the model "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]})"
        )
    model.load_state_dict(local)
    if optimizer is not None:
        _load_optimizer(folder, model, optimizer, keys, {k: v for k, v in everything.items() if k.startswith(OPTIM)})


def _load_optimizer(
    folder: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    keys: dict[str, tuple[str, tuple[int, int, int] | None]],
    saved: dict[str, Tensor],
) -> None:
    if not saved:
        raise CheckpointError(f"{folder}: no optimizer state saved (save_expert_shards was not given the optimizer)")
    by_param: dict[str, dict[str, Tensor]] = {}
    for key, value in saved.items():
        k, _, name = key.removeprefix(OPTIM).partition("/")
        by_param.setdefault(name, {})[k] = value
    wanted = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for local, param in model.named_parameters():
        name, sl = keys.get(local, (local, None))
        if id(param) not in wanted or name not in by_param:
            continue  # a parameter that never had a gradient has no state (as in the saved run)
        state = {}
        for k, v in by_param[name].items():
            sliced = sl is not None and v.dim() > 0 and v.shape[0] == sl[2] and v.shape[1:] == param.shape[1:]
            state[k] = v[sl[0] : sl[1]].clone() if sliced else v.clone()  # type: ignore[index]
        optimizer.state[param] = state
