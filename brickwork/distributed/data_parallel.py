"""A model wrapped for data parallelism: DDP by default, FSDP2 (``fully_shard``) on request.

What gets wrapped is the model's *objective*, not its ``forward``: :class:`_Objective` returns
the loss of ``(x, y)`` (the model's own ``training_loss`` when it has one, as nested models do,
else ``loss_fn(model(x), y)``), so DDP's gradient hooks and FSDP2's unshard/reshard see the
whole step, whatever method of the model computes it. :class:`DataParallel` keeps the plain
model beside the engine:

- DDP: the plain model *is* the trained one (DDP shares its parameters); ``find_unused_parameters``
  is on, because routed, early-exit and nested bricks leave some parameters out of a step. A
  parameter no rank used keeps ``grad=None`` (as in a single process), so the optimizer skips it.
- FSDP2: a deep copy of the model is sharded over a 1-D ``DeviceMesh`` (each body layer of a
  stack model is its own FSDP unit, then the root), the optimizer steps the shards, and
  :meth:`DataParallel.gather` all-gathers the full weights back into the plain model (every rank
  then holds them, as evaluation, later stages and the rank-0 checkpoint need). brickwork builds
  the full model on every rank first, so FSDP2 here saves gradient and optimizer memory during
  training, not the memory of building the model.

With ``expert_parallel=P`` (a stage's ``expert_parallel: P``), the engine trains a copy in which
every MoE holds this rank's experts only, over a ``(W / P, P)`` dp x ep mesh: DDP or FSDP2 take
everything but the experts over all W ranks, and :meth:`DataParallel.finish_gradients` (called
by ``train_step`` after the backward) reduces the experts over dp and clips to the global norm;
:meth:`DataParallel.gather` all-gathers the experts back into the plain model
(:mod:`brickwork.distributed.expert_state`).

Checkpoints stay the single-process format: :func:`model_state` / :func:`optimizer_state` give
full tensors and integer parameter ids whatever the strategy, so a state saved by 2 ranks loads
into 1, 3 or 4 (:func:`load_model_state` / :func:`load_optimizer_state`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from brickwork.distributed.batch import all_sum_start, barrier
from brickwork.distributed.expert_parallel import (
    ExpertParallelGroups,
    ExpertParallelMoE,
    clip_expert_parallel_grad_norm,
    expert_parameters,
    ignore_experts_in_ddp,
    reduce_expert_grads,
)
from brickwork.distributed.expert_parallel import expert_parallel as expert_parallel_copy
from brickwork.distributed.expert_state import (
    full_model_state,
    full_optimizer_state,
    local_model_state,
    local_optimizer_state,
)
from brickwork.distributed.fused_scalars import ScalarRider
from brickwork.distributed.process_group import DistContext
from brickwork.errors import BrickworkError
from brickwork.nn.sparse.rewiring import Rewiring

Strategy = Literal["ddp", "fsdp"]
LossFn = Callable[[Tensor, Tensor], Tensor]


class _Objective(nn.Module):
    """The model's training objective as a module: ``forward(x, y)`` is the step's task loss."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.loss_fn: LossFn | None = None

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        assert self.loss_fn is not None, "set loss_fn before the forward"
        objective = getattr(self.model, "training_loss", None)
        return objective(x, y, self.loss_fn) if callable(objective) else self.loss_fn(self.model(x), y)

    def predict(self, x: Tensor) -> Tensor:
        """``model(x)`` through the wrapper (FSDP2 registers it as a forward method)."""
        return self.model(x)


class DataParallel(nn.Module):
    """``model`` trained by ``ctx.world_size`` ranks; behaves as the model for ``forward(x)``.

    Args:
        model: the plain model (built identically on every rank).
        ctx: the rank and its group.
        strategy: ``"ddp"`` (replicated weights, all-reduced gradients) or ``"fsdp"`` (FSDP2:
            parameters, gradients and optimizer state sharded over the ranks).
        expert_parallel: shard the MoE layers' experts over groups of this many ranks
            (:func:`wrap`); None: no expert parallelism.
        find_unused_parameters: DDP's search of the autograd graph for parameters a step left
            out (on: routed, early-exit and nested bricks do; ``bench distributed --breakdown``
            measures what turning it off saves for a model that never leaves one out).
        fuse_scalars: DDP: the step's scalars (loss, auxiliary losses, skip flag) ride in the
            last gradient bucket (:class:`~brickwork.distributed.fused_scalars.ScalarRider`), so
            a step makes one all-reduce; off: they get their own (``bench distributed
            --breakdown`` pairs the two).

    Raises:
        BrickworkError: FSDP2 cannot shard this model (the message names the module).
    """

    plain: nn.Module  # the model as built: full weights (after gather() under FSDP2)
    engine: nn.Module  # what the step runs: DDP(objective), or the fully_shard-ed objective

    def __init__(
        self,
        model: nn.Module,
        ctx: DistContext,
        strategy: Strategy = "ddp",
        expert_parallel: int | None = None,
        find_unused_parameters: bool = True,
        fuse_scalars: bool = True,
    ) -> None:
        super().__init__()
        self.ctx, self.strategy = ctx, strategy
        self.rider: ScalarRider | None = None  # DDP with fused scalars: the gradient buckets' hook
        object.__setattr__(self, "plain", model)  # not a submodule: state dicts stay the engine's
        self.groups = None if expert_parallel is None else expert_groups(ctx, expert_parallel)
        # Expert parallelism trains a copy whose MoE layers hold this rank's experts only.
        trained = model if self.groups is None else expert_parallel_copy(model, self.groups)
        if strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            self.objective = _Objective(trained)
            if self.groups is not None:  # DDP averages the rest over the world; finish_gradients the experts
                ignore_experts_in_ddp(self.objective)
            device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            engine: nn.Module = DistributedDataParallel(
                self.objective,
                device_ids=device_ids,
                process_group=ctx.group,
                find_unused_parameters=find_unused_parameters,
            )
            if fuse_scalars:
                self.rider = ScalarRider(ctx.group, ctx.world_size)
                engine.register_comm_hook(None, self.rider.hook)  # type: ignore[operator]
        elif strategy == "fsdp":
            self.objective = _Objective(copy.deepcopy(model) if self.groups is None else trained)
            experts = set(expert_parameters(self.objective).values())
            engine = _fully_shard(self.objective, ctx, experts)
        else:
            raise BrickworkError(f"data_parallel: {strategy!r} is not a strategy; expected 'ddp' or 'fsdp'")
        object.__setattr__(self, "engine", engine)
        # found once: count_rows runs every step, and a walk over every module costs a small
        # model's step ~0.2 ms (a profile of the MLP's DDP step)
        self._ep_moes = [m for m in self.objective.modules() if isinstance(m, ExpertParallelMoE)]
        self._rewirings = [m for m in self.objective.modules() if isinstance(m, Rewiring)]
        for m in self._rewirings:  # Hebbian sums wait for the ranks' sum (_reduce_captured)
            m.defer_statistics = ctx.world_size > 1

    def forward(self, x: Tensor) -> Tensor:
        return self.objective.predict(x)

    def training_loss(self, x: Tensor, y: Tensor, loss_fn: LossFn) -> Tensor:
        """The step's loss through the engine (gradients synchronised in backward)."""
        self.objective.loss_fn = loss_fn
        return self.engine(x, y)

    def reshard(self) -> None:
        """Put FSDP2's sharded parameters back in place (no-op for DDP).

        A forward without a backward (evaluation through :meth:`forward`) leaves the root unit
        unsharded, its module holding plain tensors instead of the DTensors the optimizer steps;
        the state-dict functions need the sharded ones.
        """
        if self.strategy == "fsdp":
            from torch.distributed.fsdp import FSDPModule

            for m in self.objective.modules():
                if isinstance(m, FSDPModule):
                    m.reshard()

    def gather(self) -> nn.Module:
        """Bring the full trained weights into :attr:`plain` (a collective for FSDP2 and EP); returns it."""
        self.reshard()
        if self.strategy == "fsdp" or self.groups is not None:
            local = self._engine_state()
            if self.groups is not None:  # every expert, all-gathered over its EP group
                local = full_model_state(self.objective.model, local, self.groups.ep)
            self.plain.load_state_dict(local)
        return self.plain

    def _engine_state(self) -> dict[str, Any]:
        """The trained model's state dict by its own names (FSDP2's shards gathered)."""
        if self.strategy != "fsdp":
            return self.objective.model.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.objective, options=StateDictOptions(full_state_dict=True))
        return {k.removeprefix("model."): v for k, v in full.items()}

    def scatter(self) -> None:
        """Shard :attr:`plain`'s weights into the engine (after a load; no-op for plain DDP)."""
        self.reshard()
        full = self.plain.state_dict()
        if self.groups is not None:  # this rank's slice of every expert
            full = local_model_state(self.objective.model, full)
            if self.strategy == "ddp":
                self.objective.model.load_state_dict(full)
        if self.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            full = {f"model.{k}": v for k, v in full.items()}
            set_model_state_dict(self.objective, full, options=StateDictOptions(full_state_dict=True))

    def finish_gradients(self, max_norm: float | None) -> None:
        """After ``backward``: reduce what the engine did not (EP: the experts over dp), then clip
        to the global gradient norm (every expert counted once) when ``max_norm`` is set."""
        self._reduce_captured()
        if self.groups is not None:
            reduce_expert_grads(self.objective.model, self.groups)
            if max_norm:
                clip_expert_parallel_grad_norm(self.objective.model, max_norm, self.groups)
        elif max_norm:
            torch.nn.utils.clip_grad_norm_(self.parameters(), max_norm)

    def _reduce_captured(self) -> None:
        """What bricks captured themselves, combined over the ranks in one all-reduce: RigL's
        gradient scores averaged (as DDP averages ``.grad``) and G2GNet's Hebbian activation sums
        added (each rank's slice, of its own size, into the whole batch's), then folded. The same
        steps capture on every rank, so every rank runs the same collective."""
        grads = [t for m in self._rewirings for t in m.batch_gradients()]
        sums = [t for m in self._rewirings for t in m.batch_statistics()]
        if grads or sums:
            parts = [t.reshape(-1) / self.ctx.world_size for t in grads] + [t.reshape(-1) for t in sums]
            flat = torch.cat(parts)
            dist.all_reduce(flat, group=self.ctx.group)
            for t, part in zip(grads + sums, flat.split([t.numel() for t in grads + sums]), strict=True):
                t.copy_(part.view_as(t))
        for m in self._rewirings:
            m.fold_statistics()

    def count_rows(self, counted: bool) -> None:
        """Whether this rank's rows count in global batch statistics (False for a borrowed row)."""
        for m in self._ep_moes:
            m.counted = counted
        for r in self._rewirings:
            r.counted = counted


def expert_groups(ctx: DistContext, degree: int) -> ExpertParallelGroups:
    """The groups of a ``(dp, ep) = (W / degree, degree)`` device mesh over the world.

    Raises:
        BrickworkError: ``degree`` does not divide the world size.
    """
    if degree < 1 or ctx.world_size % degree:
        raise BrickworkError(
            f"expert_parallel: {degree} does not divide the world size {ctx.world_size} (ranks form a"
            f" data-parallel x expert-parallel mesh); use a divisor of {ctx.world_size}"
        )
    return ExpertParallelGroups.from_mesh(ctx.mesh((ctx.world_size // degree, degree), ("dp", "ep")))


def _fully_shard(objective: _Objective, ctx: DistContext, experts: set[nn.Parameter]) -> nn.Module:
    """FSDP2 over a 1-D mesh of all ranks: each body layer of a stack model a unit, then the root.

    ``experts`` (an expert-parallel model's sharded experts) are left to expert parallelism: FSDP2
    ignores them (they are already split over the EP group and reduced by ``finish_gradients``).
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    from brickwork.nn.nested import NestedModel

    nested = next((m for m in objective.model.modules() if isinstance(m, NestedModel)), None)
    if nested is not None:
        raise BrickworkError(
            f"data_parallel: fsdp: FSDP2 cannot shard {type(objective.model).__name__}: its NestedModel"
            " backpropagates each sampled sub-network inside training_loss (SortedNet gradient"
            " accumulation), and FSDP2 reshards the weights after every backward; use data_parallel: ddp"
        )
    mesh = ctx.mesh((ctx.world_size,), ("dp",))
    body = getattr(objective.model, "body", None)
    layers = [m for m in body.modules() if _is_layer(m, body)] if isinstance(body, nn.Module) else []
    try:
        for layer in layers:
            if any(p not in experts for p in layer.parameters()):
                fully_shard(layer, mesh=mesh, ignored_params=experts or None)
        fully_shard(objective, mesh=mesh, ignored_params=experts or None)
    except (RuntimeError, ValueError, TypeError, AssertionError, NotImplementedError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BrickworkError(
            f"data_parallel: fsdp: FSDP2 cannot shard {type(objective.model).__name__} ({first});"
            " use data_parallel: ddp"
        ) from None
    register_fsdp_forward_method(objective, "predict")
    return objective


def _is_layer(m: nn.Module, body: nn.Module) -> bool:
    """A layer of a stack's body: a direct child, or an item of a ModuleList child."""
    if isinstance(m, nn.ModuleList):
        return False
    return any(m is c for c in body.children()) or any(
        isinstance(c, nn.ModuleList) and any(m is i for i in c) for c in body.children()
    )


def wrap(
    model: nn.Module, ctx: DistContext, strategy: Strategy = "ddp", expert_parallel: int | None = None
) -> nn.Module:
    """``model`` itself for a single process, else a :class:`DataParallel` around it.

    Args:
        expert_parallel: shard the MoE layers' experts over groups of this many ranks (the
            world is a ``(W / P, P)`` dp x ep mesh); None: every rank holds every expert.
    """
    return DataParallel(model, ctx, strategy, expert_parallel) if ctx.active else model


def finish_gradients(model: nn.Module, max_norm: float | None) -> None:
    """After ``backward``: complete the gradient reduction and clip (:meth:`DataParallel.finish_gradients`)."""
    if isinstance(model, DataParallel):
        model.finish_gradients(max_norm)
    elif max_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


def step_sums_start(model: nn.Module, values: list[float]) -> Callable[[], list[float]]:
    """Start summing a step's scalars over the ranks; call the result after the backward for the sums.

    DDP with fused scalars: they ride in the backward's last gradient bucket (no collective of
    their own); otherwise (FSDP2, DDP without fusion) their own float64 all-reduce, started now
    so it travels during the backward. A single process: the values themselves.
    """
    if isinstance(model, DataParallel) and model.rider is not None:
        return model.rider.start(values)
    return all_sum_start(context_of(model), values)


def count_rows(model: nn.Module, counted: bool) -> None:
    """Tell an expert-parallel model whether this rank's rows are real (False: a borrowed row)."""
    if isinstance(model, DataParallel):
        model.count_rows(counted)


def plain_module(model: nn.Module) -> nn.Module:
    """The plain model behind a wrapper (the model itself when it is not wrapped)."""
    return model.plain if isinstance(model, DataParallel) else model


def gathered(model: nn.Module) -> nn.Module:
    """The plain model with the full current weights (gathers FSDP2 shards; a collective)."""
    return model.gather() if isinstance(model, DataParallel) else model


def context_of(model: nn.Module) -> DistContext:
    """The context a wrapped model trains in; a single process for a plain model."""
    return model.ctx if isinstance(model, DataParallel) else DistContext()


def model_state(model: nn.Module) -> dict[str, Any]:
    """The full state dict of the plain model (gathered first under FSDP2; every rank gets it)."""
    return gathered(model).state_dict()


def load_model_state(model: nn.Module, state: dict[str, Any]) -> None:
    """Load a full state dict into the plain model, then into the engine's shards (FSDP2)."""
    plain_module(model).load_state_dict(state)
    if isinstance(model, DataParallel):
        model.scatter()


def _fqns(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's id order (ids count through the param groups)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with full tensors and integer ids (gathered under FSDP2)."""
    if isinstance(model, DataParallel) and model.groups is not None:
        state = None
        if model.strategy == "fsdp":
            state = {k.removeprefix("model."): v for k, v in _fsdp_optimizer_state(model, optimizer)["state"].items()}
        return full_optimizer_state(model.objective.model, model.plain, optimizer, model.groups.ep, state)
    if not (isinstance(model, DataParallel) and model.strategy == "fsdp"):
        return optimizer.state_dict()
    full = _fsdp_optimizer_state(model, optimizer)
    pid = {name: i for i, name in enumerate(_fqns(model.objective, optimizer))}
    groups = [{**g, "params": [pid[n] for n in g["params"]]} for g in full["param_groups"]]
    return {"state": {pid[n]: st for n, st in full["state"].items()}, "param_groups": groups}


def _fsdp_optimizer_state(model: DataParallel, optimizer: torch.optim.Optimizer) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    model.reshard()
    return get_optimizer_state_dict(model.objective, optimizer, options=StateDictOptions(full_state_dict=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a state of :func:`optimizer_state`'s format (sharded into FSDP2's optimizer)."""
    if isinstance(model, DataParallel) and model.groups is not None:
        local = local_optimizer_state(model.objective.model, model.plain, optimizer, state, model.groups.ep)
        if model.strategy == "ddp":
            params = dict(model.objective.model.named_parameters())
            for name, st in local.items():
                optimizer.state[params[name]] = st
            return
        model.reshard()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        fqn = {id(p): n for n, p in model.objective.named_parameters()}
        groups = [{**g, "params": [fqn[id(p)] for p in g["params"]]} for g in optimizer.param_groups]
        full_fsdp: Any = {"state": {f"model.{k}": v for k, v in local.items()}, "param_groups": groups}
        set_optimizer_state_dict(model.objective, optimizer, full_fsdp, options=StateDictOptions(full_state_dict=True))
        return
    if not (isinstance(model, DataParallel) and model.strategy == "fsdp"):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    model.reshard()
    for mine, saved in zip(optimizer.param_groups, state["param_groups"], strict=False):
        # plain load_state_dict replaces the groups' settings; the DCP loader wants the same keys
        mine.update({k: v for k, v in saved.items() if k != "params"})
    names = _fqns(model.objective, optimizer)
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]
    full: Any = {"state": {names[int(i)]: st for i, st in state["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(model.objective, optimizer, full, options=StateDictOptions(full_state_dict=True))


@contextmanager
def main_writes(model: nn.Module) -> Iterator[bool]:
    """Yields True on the rank that writes a checkpoint (rank 0); all ranks meet after it."""
    ctx = context_of(model)
    yield ctx.is_main
    barrier(ctx)
