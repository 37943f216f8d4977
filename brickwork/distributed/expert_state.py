"""The single-process state of an expert-parallel model, gathered from its ranks and sliced back.

A training checkpoint of an expert-parallel run is the single-process format (what
``train.checkpoint`` saves for every run): rank 0 writes the full model and optimizer state,
with every expert all-gathered over its expert-parallel group. So a state saved at EP degree P
on W ranks resumes at any degree P' on any W' (or in one process), each rank taking its slice.
(:mod:`brickwork.distributed.expert_checkpoint` is the other format: one file per EP rank,
each holding its own experts, for models too large to gather on one rank.)

Names: an expert tensor's local state-dict key (``experts.w_in``, holding experts ``[s, e)`` of a
stacked bank; ``experts.0.weight`` of a list bank) maps to its single-process key and slice
(``expert_checkpoint._expert_keys``). Optimizer ids: the single process numbers its parameters
through the optimizer's groups in the model's parameter order; the expert-parallel optimizer's
groups are mapped to the same numbering by name.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from brickwork.distributed.expert_checkpoint import _expert_keys
from brickwork.errors import CheckpointError

Keys = dict[str, tuple[str, tuple[int, int, int] | None]]


def _gather(local: dict[str, Any], experts: dict[str, tuple[str, bool]], group: Any) -> dict[str, Any]:
    """``local`` with its expert entries replaced by the EP group's: renamed, stacked slices concatenated.

    Args:
        local: this rank's values by local name.
        experts: local name of each expert value -> (its single-process name, whether it is a
            dim-0 slice of a stacked bank's tensor; otherwise it is whole: a list bank's
            expert, or a value every rank holds alike, such as a stacked bank's Adam step).
        group: the expert-parallel group (its rank order is the experts' order).
    """
    out = {k: v for k, v in local.items() if k not in experts}
    mine = {experts[k][0]: (experts[k][1], v) for k, v in local.items() if k in experts}
    parts: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, mine, group=group)
    pieces: dict[str, list[Tensor]] = {}
    for part in parts:
        for name, (sliced, v) in part.items():
            if sliced:
                pieces.setdefault(name, []).append(v)
            else:
                out[name] = v
    out.update({name: torch.cat(p) for name, p in pieces.items()})
    return out


def full_model_state(ep_model: nn.Module, local: dict[str, Any], group: Any) -> dict[str, Any]:
    """The single-process state dict from this rank's ``local`` state dict of ``ep_model`` (a collective)."""
    keys = _expert_keys(ep_model)
    return _gather(local, {k: (name, sl is not None) for k, (name, sl) in keys.items() if k in local}, group)


def local_model_state(ep_model: nn.Module, full: dict[str, Any]) -> dict[str, Any]:
    """This rank's state dict of ``ep_model`` from a single-process one (each expert tensor sliced).

    Raises:
        CheckpointError: a tensor the model has is not in ``full``.
    """
    keys = _expert_keys(ep_model)
    out: dict[str, Any] = {}
    for key in ep_model.state_dict():
        name, sl = keys.get(key, (key, None))
        if name not in full:
            raise CheckpointError(f"expert parallelism: the state has no {name!r} for {key!r}")
        out[key] = full[name] if sl is None else full[name][sl[0] : sl[1]]
    return out


def _numbering(
    ep_model: nn.Module, plain: nn.Module, optimizer: torch.optim.Optimizer, group: Any
) -> tuple[dict[str, int], list[list[int]]]:
    """Single-process optimizer id of every parameter name, and each group's ids (a collective:
    a list bank's experts are in other ranks' groups)."""
    keys = _expert_keys(ep_model)
    names = {id(p): n for n, p in ep_model.named_parameters()}
    mine = [[keys.get(names[id(p)], (names[id(p)], None))[0] for p in g["params"]] for g in optimizer.param_groups]
    parts: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, mine, group=group)
    order = {n: i for i, (n, _) in enumerate(plain.named_parameters())}
    ids: dict[str, int] = {}
    members: list[list[int]] = []
    for gi in range(len(mine)):
        start = len(ids)
        for name in sorted({n for part in parts for n in part[gi]}, key=order.__getitem__):
            ids[name] = len(ids)
        members.append(list(range(start, len(ids))))
    return ids, members


def _global_names(ep_model: nn.Module) -> dict[str, tuple[nn.Parameter, str, tuple[int, int, int] | None]]:
    keys = _expert_keys(ep_model)
    return {n: (p, *keys.get(n, (n, None))) for n, p in ep_model.named_parameters()}


def full_optimizer_state(
    ep_model: nn.Module,
    plain: nn.Module,
    optimizer: torch.optim.Optimizer,
    group: Any,
    state: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The single-process ``optimizer.state_dict()`` of ``plain`` (a collective over the EP group).

    Args:
        ep_model: the expert-parallel model the optimizer steps.
        plain: the single-process model (its parameter order numbers the ids).
        optimizer: over ``ep_model``'s parameters.
        group: the expert-parallel group.
        state: per-parameter state by ``ep_model`` name with full replicated tensors (FSDP2's
            gathered state); default ``optimizer.state``.
    """
    params = _global_names(ep_model)
    if state is None:
        names = {id(p): n for n, p in ep_model.named_parameters()}
        state = {names[id(p)]: st for p, st in optimizer.state.items()}
    local: dict[str, Any] = {}
    experts: dict[str, tuple[str, bool]] = {}
    for n, st in state.items():
        p, name, sl = params[n]
        for k, v in st.items():
            local[f"{n}/{k}"] = v
            if name != n or sl is not None:  # an expert's state: a moment is sliced like its parameter
                experts[f"{n}/{k}"] = (f"{name}/{k}", sl is not None and isinstance(v, Tensor) and v.shape == p.shape)
    full = _gather(local, experts, group)
    ids, members = _numbering(ep_model, plain, optimizer, group)
    out: dict[int, dict[str, Any]] = {}
    for key, v in full.items():
        name, _, k = key.rpartition("/")
        out.setdefault(ids[name], {})[k] = v
    groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": m}
        for g, m in zip(optimizer.param_groups, members, strict=True)
    ]
    return {"state": dict(sorted(out.items())), "param_groups": groups}


def local_optimizer_state(
    ep_model: nn.Module, plain: nn.Module, optimizer: torch.optim.Optimizer, full: dict[str, Any], group: Any
) -> dict[str, dict[str, Any]]:
    """This rank's per-parameter state by ``ep_model`` name from a single-process state dict
    (a collective); also sets the optimizer's group settings from the saved ones.

    Raises:
        CheckpointError: the saved groups do not match the optimizer's.
    """
    ids, _ = _numbering(ep_model, plain, optimizer, group)
    saved = full["param_groups"]
    if len(saved) != len(optimizer.param_groups):
        raise CheckpointError(
            f"optimizer: {len(saved)} saved parameter groups, the optimizer has {len(optimizer.param_groups)}"
        )
    for mine, g in zip(optimizer.param_groups, saved, strict=True):
        mine.update({k: v for k, v in g.items() if k != "params"})
    by_id = {int(i): st for i, st in full["state"].items()}
    out: dict[str, dict[str, Any]] = {}
    for n, (p, name, sl) in _global_names(ep_model).items():
        st = by_id.get(ids[name])
        if st is None:
            continue  # never stepped (no gradient yet): no state, as in the saved run
        sliced = {}
        for k, v in st.items():
            cut = sl is not None and isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == sl[2]
            cut = cut and v.shape[1:] == p.shape[1:]
            sliced[k] = v[sl[0] : sl[1]].clone() if cut else (v.clone() if isinstance(v, Tensor) else v)  # type: ignore[index]
        out[n] = sliced
    return out
