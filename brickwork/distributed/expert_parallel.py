"""Expert parallelism: a mixture of experts whose experts are sharded over a group of ranks.

:class:`ExpertParallelMoE` computes what :class:`brickwork.nn.moe.MoE` computes on the global
batch (the ranks' batches concatenated in rank order), with each rank holding only ``E / P`` of
the experts. Every rank routes its own tokens with a replicated router, sends each assignment
row to the rank owning its expert (:mod:`brickwork.distributed.expert_dispatch`: counts, then
tokens with uneven splits), runs its local experts on contiguous rows with the same grouped
path as the single-process MoE, and gets the outputs back by the reverse exchange; the backward
runs through the same exchanges.

Composed with data parallelism over a 2-D mesh ``("dp", "ep")``: experts are sharded along
``ep`` and replicated along ``dp``; everything else (router, shared expert, the rest of the
model) is replicated on every rank. What must be global is global:

* auxiliary losses (Switch ``load_balance``, ST-MoE ``z_loss``) are computed over the global
  batch, with the per-expert loads and probability sums summed over all ranks (the single
  process's ``E * sum_i f_i P_i`` on the full batch, not a mean of per-rank losses, which
  differs because ``f`` and ``P`` are batch statistics);
* the routing record's ``load`` is the global per-expert load, and the auxiliary-loss-free
  selection bias counts the global load;
* gradients (:func:`reduce_expert_parallel_grads`): a replicated parameter's gradient is averaged over all
  W ranks (as DDP does); an expert's gradient arrives through the exchanges already summed over
  its EP group's ranks, so it is summed over ``dp`` and divided by W. Dividing by the EP size is
  the step whose omission makes expert gradients exactly P times too large (pytorch #160285);
  summing the router's per-rank partial gradients is the one transformers #48205 missed. An
  expert that received no token gets a zero gradient, never None, so its optimizer state moves
  exactly as in the single process (NeMo Automodel #2995).
* gradient clipping (:func:`clip_expert_parallel_grad_norm`) uses the global norm: replicated parameters once,
  each expert once (Megatron #5916 undercounted it).

Limits (refused with one clear message): expert-choice routing and a capacity limit decide from
the whole batch (an expert's top-C tokens, the first C assignments), so they are not causal and
are not split over ranks; dispatch is dropless.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from brickwork.distributed.expert_dispatch import all_gather, all_reduce_sum, check_expert_split, combine, dispatch
from brickwork.errors import BrickworkError
from brickwork.nn.moe import MoE, route
from brickwork.nn.routing import (
    ExpertChoiceRouter,
    ExpertList,
    GroupedFFNExperts,
    Routing,
    RoutingRecord,
    plan_dispatch,
)
from brickwork.nn.routing.losses import cv_squared
from brickwork.nn.routing.types import router_precision


@dataclass(frozen=True)
class ExpertParallelGroups:
    """The process groups an expert-parallel model talks over.

    Attributes:
        ep: the expert-parallel group (P ranks sharing one set of E experts).
        dp: the data-parallel group of ranks holding the same experts, or None when every rank is
            in one EP group.
        world: the group the global batch is split over (all ``dp x ep`` ranks).
    """

    ep: Any
    dp: Any
    world: Any

    @property
    def ep_size(self) -> int:
        return int(dist.get_world_size(self.ep))

    @property
    def ep_rank(self) -> int:
        return int(dist.get_rank(self.ep))

    @property
    def world_size(self) -> int:
        return int(dist.get_world_size(self.world))

    @classmethod
    def from_mesh(cls, mesh: Any) -> ExpertParallelGroups:
        """Groups of a device mesh with an ``"ep"`` dimension and optionally a ``"dp"`` one.

        Raises:
            BrickworkError: the mesh has no ``"ep"`` dimension, or dimensions other than dp / ep.
        """
        names = tuple(mesh.mesh_dim_names or ())
        if "ep" not in names or not set(names) <= {"dp", "ep"}:
            raise BrickworkError(f"expert parallelism: mesh dimensions {names}; expected ('ep',) or ('dp', 'ep')")
        dp = mesh["dp"].get_group() if "dp" in names and mesh["dp"].size() > 1 else None
        return cls(ep=mesh["ep"].get_group(), dp=dp, world=dist.group.WORLD)


def _check_routable(moe: MoE, where: str) -> None:
    if isinstance(moe.router, ExpertChoiceRouter):
        raise BrickworkError(
            f"{where}: router expert_choice picks each expert's top tokens over the whole batch (not causal), "
            "so it cannot be split over ranks; use a token-choice router (topk, sigmoid, hash, dense_to_sparse, ...)"
        )
    if moe.capacity_factor is not None:
        raise BrickworkError(
            f"{where}: capacity_factor {moe.capacity_factor} drops assignments by their place in the whole batch; "
            "expert parallelism is dropless (set capacity_factor to null)"
        )


def check_expert_parallel(model: nn.Module, degree: int, where: str = "expert_parallel") -> None:
    """Refuse, before any work, a model that cannot be expert-parallel over ``degree`` ranks.

    Raises:
        BrickworkError: (one line, naming the MoE's module path) no MoE layer, a non-causal router
            or a capacity limit, a bank that cannot be sharded, or ``degree`` not dividing the experts.
    """
    moes = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]
    if not moes:
        raise BrickworkError(
            f"{where}: {degree}: the model ({type(model).__name__}) has no MoE layer whose experts could be sharded"
        )
    for name, moe in moes:
        at = f"{where}: MoE {name or type(model).__name__}"
        _check_routable(moe, at)
        check_expert_split(moe.num_experts, degree, at)
        if not isinstance(moe.experts, GroupedFFNExperts | ExpertList):
            raise BrickworkError(
                f"{at}: expert bank {type(moe.experts).__name__} cannot be sharded; use GroupedFFNExperts or a list"
            )


def shard_bank(bank: nn.Module, start: int, stop: int, where: str = "experts") -> nn.Module:
    """A copy of experts ``[start, stop)`` of ``bank`` as a bank of ``stop - start`` experts.

    Raises:
        BrickworkError: a bank that is neither :class:`GroupedFFNExperts` nor :class:`ExpertList`.
    """
    if isinstance(bank, GroupedFFNExperts):
        p = bank.w_in
        glu, bias = bank.glu, bank.b_in is not None
        kw: dict[str, Any] = {"device": p.device, "dtype": p.dtype}
        out = GroupedFFNExperts(stop - start, bank.dim, bank.hidden, bank.act_name, glu, bias, bank.backend, **kw)
        with torch.no_grad():
            for name, param in out.named_parameters():
                param.copy_(getattr(bank, name)[start:stop])
        return out
    if isinstance(bank, ExpertList):
        return ExpertList(copy.deepcopy(bank[i]) for i in range(start, stop))
    raise BrickworkError(
        f"{where}: expert bank {type(bank).__name__} cannot be sharded; use GroupedFFNExperts or a list of experts"
    )


class _GatheredKeys:
    """The full bank's ``w_in`` for routers that read the experts' keys (``emoe``), all-gathered."""

    def __init__(self, local: nn.Module, group: Any) -> None:
        self._local, self._group = local, group
        self.glu = bool(getattr(local, "glu", False))

    @property
    def w_in(self) -> Tensor:
        return all_gather(cast(Tensor, self._local.w_in), self._group)


class ExpertParallelMoE(nn.Module):
    """A :class:`~brickwork.nn.moe.MoE` with its experts sharded over an expert-parallel group.

    Built from a single-process MoE with :meth:`from_moe` (every rank passes the same weights);
    its state-dict keys are the MoE's (``router.*``, ``shared.*``, ``experts.*``), the expert
    tensors holding this rank's experts ``[expert_offset, expert_offset + E / P)``.

    Args:
        experts: the local bank of ``E / P`` experts (``(x_sorted, counts)`` contract).
        router: the replicated router over all E experts.
        shared: the replicated shared expert, or None.
        num_experts: E.
        groups: the process groups (:class:`ExpertParallelGroups`).

    Shapes:
        (..., D) -> (..., D)
    """

    def __init__(
        self, experts: nn.Module, router: nn.Module, shared: nn.Module | None, num_experts: int,
        groups: ExpertParallelGroups,
    ) -> None:  # fmt: skip
        super().__init__()
        local = check_expert_split(num_experts, groups.ep_size)
        if int(cast(int, experts.num_experts)) != local:
            raise ValueError(f"ExpertParallelMoE: the local bank has {experts.num_experts} experts, expected {local}")
        self.experts, self.router, self.shared = experts, router, shared
        self.num_experts, self.local_experts = num_experts, local
        self.expert_offset = groups.ep_rank * local
        self.groups = groups
        if hasattr(router, "_bank"):  # emoe reads every expert's keys: give it the gathered bank
            router._bank = [_GatheredKeys(experts, groups.ep)]  # type: ignore[assignment]
        self.aux_losses: dict[str, Tensor] = {}
        self.record: RoutingRecord | None = None
        #: False while this rank computes on a borrowed row (its slice of the batch is empty):
        #: its tokens then count in neither the global load nor the auxiliary losses.
        self.counted = True

    @classmethod
    def from_moe(cls, moe: MoE, groups: ExpertParallelGroups, where: str = "moe") -> ExpertParallelMoE:
        """This rank's shard of ``moe`` (copied; ``moe`` is left as it is).

        Raises:
            BrickworkError: the group size does not divide the experts, a non-causal router or a
                capacity limit (see the module docstring), or a bank that cannot be sharded.
        """
        _check_routable(moe, where)
        local = check_expert_split(moe.num_experts, groups.ep_size, where)
        start = groups.ep_rank * local
        bank = shard_bank(moe.experts, start, start + local, f"{where}.experts")
        router, shared = copy.deepcopy(moe.router), copy.deepcopy(moe.shared)
        return cls(bank, router, shared, moe.num_experts, groups)

    def forward(self, x: Tensor) -> Tensor:
        lead, d = x.shape[:-1], x.shape[-1]
        flat, routing = route(self.router, x, self.num_experts)
        plan = plan_dispatch(routing)  # dropless: sorted by global expert, hence by destination rank
        rows = flat.index_select(0, plan.token_idx)
        local_rows, exchange = dispatch(rows, plan.counts, self.groups.ep)
        y_local = self.experts(local_rows, exchange.local_counts)
        if local_rows.shape[0] == 0:
            # A bank given no rows returns zeros that do not depend on its input, so autograd would
            # skip this rank's half of the dispatch exchange's backward and the others would wait
            # for it forever: keep the (empty) input in the graph.
            y_local = y_local + local_rows.sum()
        y = combine(y_local, exchange)
        out = torch.zeros_like(flat).index_add(0, plan.token_idx, y * plan.weights.unsqueeze(-1).to(flat.dtype))
        if self.shared is not None:
            out = out + self.shared(flat)
        load, num_tokens = self._global_load(routing, plan.counts)
        self.aux_losses = global_aux_losses(routing, load, num_tokens, self.groups.world, self.counted)
        kept = torch.ones(routing.num_assignments, dtype=torch.bool, device=x.device)  # dropless
        self.record = RoutingRecord.of(routing, tuple(lead), kept, load)  # load: the global batch's
        return out.reshape(*lead, d)

    @torch.no_grad()
    def _global_load(self, routing: Routing, local_load: Tensor) -> tuple[Tensor, int]:
        """(E,) assignments per expert and the number of tokens, over the global batch (one all-reduce)."""
        w = 1 if self.counted else 0
        packed = torch.cat([local_load * w, local_load.new_tensor([routing.num_tokens * w])])
        dist.all_reduce(packed, group=self.groups.world)
        load = packed[:-1]
        bias = getattr(self.router, "selection_bias", None)
        if bias is not None and self.training:  # the router observed its own load; the balance needs everyone's
            bias.pending_load += (load - local_load).double()
        return load, int(packed[-1])

    def extra_repr(self) -> str:
        stop = self.expert_offset + self.local_experts
        return f"num_experts={self.num_experts}, local experts [{self.expert_offset}, {stop}), dropless"


#: The router losses with a global-batch form here: Switch's load balancing, ST-MoE's z-loss,
#: Shazeer et al.'s importance and load (``CV^2`` of a per-expert sum over the tokens).
GLOBAL_AUX_LOSSES = ("load_balance", "z_loss", "importance", "load")
_CV_SQUARED = ("importance", "load")


def global_aux_losses(
    routing: Routing, load: Tensor, num_tokens: int, group: Any, counted: bool = True
) -> dict[str, Tensor]:
    """The router's auxiliary losses over the global batch (each rank gets the same value).

    Every loss is a function of sums over the tokens, so one all-reduce of this rank's sums
    gives the single process's loss on the full batch: Switch's ``E * sum_i f_i P_i`` from the
    global load and probability sums, the z-loss from the sum of ``logsumexp^2``, and Shazeer
    et al.'s importance and load losses as ``CV^2`` of the summed (E,) importance and smooth
    load (``routing.aux_sums``; the CV of per-rank sums would differ).

    Args:
        routing: this rank's routing; its ``aux_losses`` name the losses to compute.
        load: (E,) global assignments per expert (dropless: every assignment is dispatched).
        num_tokens: global number of tokens.
        group: the group the batch is split over.
        counted: False for a rank computing on a borrowed row (an empty slice of the batch):
            its sums then count zero.

    Raises:
        BrickworkError: a loss with no known global form.
    """
    names = [n for n in GLOBAL_AUX_LOSSES if n in routing.aux_losses]
    unknown = set(routing.aux_losses) - set(GLOBAL_AUX_LOSSES)
    if unknown:
        raise BrickworkError(
            f"expert parallelism: router loss {sorted(unknown)} has no global form;"
            f" known: {', '.join(GLOBAL_AUX_LOSSES)}"
        )
    if not names:
        return {}
    parts: list[Tensor] = []
    if "load_balance" in names:
        assert routing.probs is not None
        parts.append(routing.probs.sum(0))
    if "z_loss" in names:
        assert routing.logits is not None
        parts.append(torch.logsumexp(router_precision(routing.logits), dim=-1).square().sum().reshape(1))
    for name in _CV_SQUARED:
        if name in names:
            if name not in routing.aux_sums:
                raise BrickworkError(f"expert parallelism: the router gave loss {name!r} without its (E,) sum")
            parts.append(routing.aux_sums[name])
    dtype = torch.promote_types(torch.result_type(parts[0], parts[-1]), torch.float32)
    local = torch.cat([p.to(dtype) for p in parts])
    sums = all_reduce_sum(local if counted else local * 0, group)
    out: dict[str, Tensor] = {}
    e, at = routing.num_experts, 0
    if "load_balance" in names:
        f = load.to(sums.dtype) / load.sum().clamp_min(1)  # Switch's f_i: fraction of assignments
        out["load_balance"] = e * torch.sum(f * sums[:e] / num_tokens)  # P_i: mean probability, global batch
        at = e
    if "z_loss" in names:
        out["z_loss"] = sums[at] / num_tokens
        at += 1
    for name in _CV_SQUARED:
        if name in names:
            out[name] = cv_squared(sums[at : at + e])
            at += e
    return out


def expert_parallel(model: nn.Module, groups: ExpertParallelGroups) -> nn.Module:
    """A copy of ``model`` with every :class:`MoE` replaced by this rank's :class:`ExpertParallelMoE`.

    Every rank must call it with the same weights (same seed, or loaded from one checkpoint).

    Raises:
        BrickworkError: no MoE in ``model``, or as :meth:`ExpertParallelMoE.from_moe` (naming the module path).
    """
    if not any(isinstance(m, MoE) for m in model.modules()):
        name = type(model).__name__
        raise BrickworkError(f"expert parallelism: {name} has no MoE layer whose experts could be sharded")
    out = copy.deepcopy(model)
    for name, module in list(out.named_modules()):
        if isinstance(module, MoE):
            parent_name, _, child = name.rpartition(".")
            parent = out.get_submodule(parent_name) if parent_name else out
            if not child:
                raise BrickworkError("expert parallelism: wrap the model that contains the MoE, not the MoE itself")
            setattr(parent, child, ExpertParallelMoE.from_moe(module, groups, where=name))
    return out


def expert_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The sharded parameters (this rank's experts), by their state-dict names."""
    out: dict[str, nn.Parameter] = {}
    for name, module in model.named_modules():
        if isinstance(module, ExpertParallelMoE):
            prefix = f"{name}.experts." if name else "experts."
            out.update({prefix + n: p for n, p in module.experts.named_parameters()})
    return out


def ignore_experts_in_ddp(model: nn.Module) -> None:
    """Have DDP (wrapping ``model`` afterwards) leave the sharded experts alone.

    DDP would broadcast rank 0's experts over every rank at construction and average gradients
    of different experts; with them ignored, DDP averages the replicated parameters over its
    group (the world) and :func:`reduce_expert_grads` reduces the experts after ``backward``.
    """
    names = list(expert_parameters(model))
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)


def _groups_of(model: nn.Module) -> ExpertParallelGroups | None:
    for module in model.modules():
        if isinstance(module, ExpertParallelMoE):
            return module.groups
    return None


def _reduce(grads: list[Tensor], group: Any, scale: float) -> None:
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])  # one collective for the whole set
    if group is not None:
        dist.all_reduce(flat, group=group)
    flat.mul_(scale)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


@torch.no_grad()
def reduce_expert_parallel_grads(model: nn.Module, groups: ExpertParallelGroups | None = None) -> None:
    """Make every rank's gradients those of the global-batch mean loss (call after ``backward``).

    Replicated parameters: mean over all W ranks (skip this part when DDP already does it, by
    passing only the experts to :func:`reduce_expert_grads`). Experts: sum over ``dp``,
    divided by W; an expert without gradient gets zeros first.
    """
    groups = groups or _groups_of(model)
    if groups is None:
        return
    experts = {id(p) for p in expert_parameters(model).values()}
    replicated = [p.grad for p in model.parameters() if id(p) not in experts and p.grad is not None]
    _reduce(replicated, groups.world, 1.0 / groups.world_size)
    reduce_expert_grads(model, groups)


@torch.no_grad()
def reduce_expert_grads(model: nn.Module, groups: ExpertParallelGroups | None = None) -> None:
    """The experts' part of :func:`reduce_expert_parallel_grads` (for use beside DDP, which averages the rest)."""
    groups = groups or _groups_of(model)
    if groups is None:
        return
    params = list(expert_parameters(model).values())
    for p in params:
        if p.grad is None:  # no token reached it on any rank of its group: zero, not None
            p.grad = torch.zeros_like(p)
    _reduce([cast(Tensor, p.grad) for p in params], groups.dp, 1.0 / groups.world_size)


@torch.no_grad()
def clip_expert_parallel_grad_norm(
    model: nn.Module, max_norm: float, groups: ExpertParallelGroups | None = None
) -> Tensor:
    """Clip to the global gradient norm (every expert counted once); returns that norm.

    The same rule as :func:`torch.nn.utils.clip_grad_norm_` (scale by ``max_norm / (norm + 1e-6)``
    when below 1), on reduced gradients (:func:`reduce_expert_parallel_grads` first).
    """
    from torch.distributed.tensor import DTensor

    groups = groups or _groups_of(model)
    experts = {id(p) for p in expert_parameters(model).values()}
    grads = [(id(p) in experts, p.grad) for p in model.parameters() if p.grad is not None]
    zero = torch.zeros((), dtype=torch.float64)

    def squares(gs: list[Tensor]) -> Tensor:
        return sum((g.double().square().sum() for g in gs), zero)

    replicated = squares([g for e, g in grads if not e and not isinstance(g, DTensor)])
    # FSDP2's shards (EP composed with FSDP2): each rank holds its part of the replicated parameters
    fsdp = squares([g.to_local() for e, g in grads if not e and isinstance(g, DTensor)])
    sharded = squares([g for e, g in grads if e])
    if groups is not None:
        dist.all_reduce(sharded, group=groups.ep)  # each EP rank holds other experts; dp replicas agree
        if any(isinstance(g, DTensor) for _, g in grads):
            dist.all_reduce(fsdp, group=groups.world)
    norm = (replicated + fsdp + sharded).sqrt()
    coef = float((max_norm / (norm + 1e-6)).clamp(max=1.0))
    for _, g in grads:
        g.mul_(coef)
    return norm
