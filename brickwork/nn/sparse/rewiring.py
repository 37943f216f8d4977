"""Dynamic sparse training of a group-connected layer: prune and regrow on a schedule.

A :class:`Rewiring` is handed to :class:`~brickwork.nn.sparse.linear.GroupLinear` and driven by
the training hooks (``brickwork.nn.hooks``): the layer calls :meth:`Rewiring.observe` on every
training forward, :meth:`Rewiring.update` from its ``after_step`` and :meth:`Rewiring.epoch_end`
from its ``after_epoch``; ``set_progress`` reaches the rewiring directly. Density is held fixed at two levels:

* ``edge``: inside the connected blocks, the edge mask (SET / RigL on unstructured weights);
* ``group``: which input groups each output group reads; a dropped block's slot is refilled
  with another input group, so every output group keeps its in-degree and the layer stays one
  batched matmul.

Regrowth scores:

* ``random``: SET (Mocanu et al., 2018).
* ``gradient``: RigL (Evci et al., 2020). Edges: |dL/dW| of the masked weights, read from the
  connected blocks' gradient the kernel computes anyway (a hook on the masked weight, on update
  steps only). Blocks: the norm of the *dense* gradient dL/dW = dy^T x of each unconnected
  block, computed on the update step's batch from the layer's input x and output gradient dy,
  kept just for that step: one dense (d_out, B, d_in) matmul per ``interval`` steps, e.g. 1% of
  a dense layer's cost at interval 100, and nothing on the other steps.
* ``hebbian``: G2GNet's rule (Konstantaropoulos et al., 2025): the most correlated activations,
  from :class:`~brickwork.nn.sparse.stats.ActivationStats` (groups: running averages updated on
  every training forward; edges: a window of ``window`` steps before each update).

Magnitudes for dropping: |w| for edges, the RMS of a block's active weights for blocks.

Optimizer state: parameters keep their shapes, so the optimizer's references stay valid. The
forward multiplies by the mask, so masked weights get zero gradients; dropped and grown weights
are set to zero, and the training loop zeroes the optimizer's moments at the grown positions
(``GroupLinear.take_regrown``, as RigL does): otherwise a regrown weight would inherit the second moment
of the connection that last used its slot (another input group's, for a moved block), which
damps its first steps.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Protocol, cast

import pydantic
import pydantic.dataclasses
import torch
from torch import Tensor, nn

from brickwork.errors import ConfigError
from brickwork.nn.sparse.kernel import BlockPlan
from brickwork.nn.sparse.rewire import swap_blocks, swap_edges
from brickwork.nn.sparse.schedule import Decay, PruneSchedule
from brickwork.nn.sparse.stats import ActivationStats

Regrow = Literal["random", "gradient", "hebbian"]
Level = Literal["edge", "group", "both"]
StepsOrEpoch = Annotated[int, pydantic.Field(ge=1)] | Literal["epoch"]

# Each method's own schedule (the settings' defaults, by ``regrow``):
# SET (Mocanu et al., 2018; its code): ζ = 0.3 of the connections after every epoch but the
# last, constant. RigL (Evci et al., 2020, Sec. 4 and its code): α = 0.3, ΔT = 100 steps, cosine
# decay, T_end = 0.75 of training. The Hebbian rule (G2GNet) is given RigL's schedule here; this
# is brickwork's choice, not a value read from the G2GNet paper.
PAPER_SCHEDULES: dict[str, dict[str, Any]] = {
    "random": {"interval": "epoch", "fraction": 0.3, "decay": "constant", "stop": 1.0},
    "gradient": {"interval": 100, "fraction": 0.3, "decay": "cosine", "stop": 0.75},
    "hebbian": {"interval": 100, "fraction": 0.3, "decay": "cosine", "stop": 0.75},
    "none": {"interval": 100, "fraction": 0.3, "decay": "cosine", "stop": 0.75},
}


class RewiredLayer(Protocol):
    """What a policy reads and edits on its layer, :class:`~brickwork.nn.sparse.linear.GroupLinear`.

    A protocol rather than an import: the layer imports its policy, so the policy cannot import
    the layer without an import cycle.
    """

    weight: nn.Parameter  # (G_out, b_out, K * b_in) compressed weight
    mask: Tensor | None  # (G_out, b_out, K * b_in) bool edge mask, or None
    sources: Tensor  # (G_out, K) input group of each slot
    in_perm: Tensor  # (d_in,) input unit order
    d_in: int
    d_out: int
    groups_in: int
    groups_out: int
    block_in: int
    block_out: int
    k: int

    def plan(self) -> BlockPlan: ...

    def effective_weight(self) -> Tensor: ...


@pydantic.dataclasses.dataclass(frozen=True, config=pydantic.ConfigDict(extra="forbid"))
class RewiringSettings:
    """Whether and how the group-connected layers of a model are rewired during training.

    One definition for every place that attaches a :class:`Rewiring` from settings (the
    ``sparse_mlp`` builder, the ``sparsify`` stage); configs set the fields flat. The fields
    are :class:`Rewiring`'s arguments, plus ``regrow: none`` for static wiring.

    Attributes:
        regrow: ``none`` (static), ``random`` (SET), ``gradient`` (RigL) or ``hebbian`` (G2GNet).
        level: what is rewired: ``edge``, ``group`` or ``both``; None: the builder's default
            (``sparse_mlp``: ``edge``, moving single edges anywhere in the layer, within and
            across the group-to-group pattern; the ``sparsify`` stage: ``group``).
        interval: optimizer steps between topology updates, or ``epoch`` (after every epoch).
        fraction: fraction moved at the first update (then decayed by ``decay``).
        decay: ``cosine`` (RigL), ``linear`` or ``constant`` (SET).
        stop: fraction of training after which the topology is frozen.
        window: steps of edge statistics gathered before each update (``hebbian``, edge level).
        momentum: EMA factor of the group activity statistics (``hebbian``).

    ``interval``, ``fraction``, ``decay`` and ``stop`` left unset take the paper's schedule of
    the chosen ``regrow`` (:data:`PAPER_SCHEDULES`: SET's ζ = 0.3 every epoch, constant; RigL's
    α = 0.3 every 100 steps, cosine-decayed to 0 at 75% of training); the resolved settings hold
    the values, so a written config shows them.
    """

    regrow: Literal["none", "random", "gradient", "hebbian"] = "none"
    level: Level | None = None
    interval: StepsOrEpoch | None = None
    fraction: Annotated[float, pydantic.Field(ge=0, le=1)] | None = None
    decay: Decay | None = None
    stop: Annotated[float, pydantic.Field(gt=0, le=1)] | None = None
    window: Annotated[int, pydantic.Field(ge=1)] = 20
    momentum: Annotated[float, pydantic.Field(ge=0, lt=1)] = 0.99

    def __post_init__(self) -> None:
        for name, value in PAPER_SCHEDULES[self.regrow].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)  # frozen: filled once, at construction

    def policy(self, level: Level = "group") -> Rewiring | None:
        """A fresh :class:`Rewiring` with these settings (``level`` when the settings leave it
        unset), or None for static wiring."""
        if self.regrow == "none":
            return None
        assert self.interval is not None and self.fraction is not None
        assert self.decay is not None and self.stop is not None  # filled by __post_init__
        return Rewiring(
            self.regrow,
            self.level or level,
            self.interval,
            self.fraction,
            self.decay,
            self.stop,
            self.window,
            self.momentum,
        )

    def check(self, path: str = "") -> None:
        """With ``regrow: none`` nothing is rewired: reject a rewiring field set away from its default.

        Raises:
            ConfigError: naming the key, e.g. ``models.g2g.interval``.
        """
        if self.regrow not in ("none", "random") and self.interval == "epoch":
            where = f"{path}.interval" if path else "interval"
            raise ConfigError(
                where, f"'epoch' (SET's schedule) needs regrow 'random'; {self.regrow} needs a step count", "epoch"
            )
        if self.regrow != "none":
            return
        default = RewiringSettings()
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if value != getattr(default, name):
                where = f"{path}.{name}" if path else name
                raise ConfigError(
                    where,
                    "is a rewiring setting, unused with regrow 'none' (static wiring); set "
                    "regrow (random, gradient or hebbian) or leave it at its default "
                    f"{getattr(default, name)!r}",
                    value,
                )


class Rewiring(nn.Module):
    """Prune-and-regrow policy for one :class:`~brickwork.nn.sparse.linear.GroupLinear`.

    Args:
        regrow: ``random`` (SET), ``gradient`` (RigL) or ``hebbian`` (G2GNet).
        level: ``edge`` (needs an edge mask: ``edge_density < 1``), ``group`` or ``both``.
        interval: optimizer steps between updates, or ``"epoch"``: after every epoch (SET; random only).
        fraction: fraction of active edges / connected blocks moved at the first update.
        decay: ``cosine`` (RigL), ``linear`` or ``constant`` (SET).
        stop: fraction of training after which the topology is frozen.
        window: steps before each update over which edge correlations are gathered (``hebbian``).
        momentum: EMA factor of the group activity statistics (``hebbian``).
    """

    # Buffers (registered in __init__).
    step: Tensor
    progress: Tensor
    seed: Tensor
    edges_moved: Tensor
    blocks_moved: Tensor

    def __init__(
        self,
        regrow: Regrow = "gradient",
        level: Level = "group",
        interval: StepsOrEpoch = 100,
        fraction: Annotated[float, pydantic.Field(ge=0, le=1)] = 0.3,
        decay: Decay = "cosine",
        stop: Annotated[float, pydantic.Field(gt=0, le=1)] = 0.75,
        window: Annotated[int, pydantic.Field(ge=1)] = 20,
        momentum: Annotated[float, pydantic.Field(ge=0, lt=1)] = 0.99,
    ) -> None:
        super().__init__()
        if interval == "epoch" and regrow != "random":
            # RigL's gradient and the Hebbian edge window are gathered on the steps before a
            # step-counted update; an epoch-end update has neither.
            raise ValueError(f"rewiring: interval 'epoch' (SET's schedule) needs regrow 'random', got {regrow!r}")
        self.regrow: Regrow = regrow
        self.level: Level = level
        self.schedule = PruneSchedule(interval, fraction, decay, stop)
        self.window = window
        self.momentum = momentum
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("progress", torch.zeros((), dtype=torch.float64))
        # Random regrowth draws from a generator seeded by (seed, step): a resumed run repeats it.
        self.register_buffer("seed", torch.randint(0, 2**31 - 1, ()))
        self.register_buffer("edges_moved", torch.zeros((), dtype=torch.long))
        self.register_buffer("blocks_moved", torch.zeros((), dtype=torch.long))
        self.stats: ActivationStats | None = None
        self.record: dict[str, Any] | None = None
        # Captured on an update step's forward/backward, consumed by that step's update.
        self._pairs: list[tuple[Tensor, list[Tensor]]] = []
        self._edge_grad: Tensor | None = None
        self._dense: Tensor | None = None  # the pairs' dense gradient, once summed
        self._regrown: Tensor | None = None  # (G_out, b_out, K) bool, until taken by the loop
        # Hebbian statistics under data parallelism: each forward's sums wait here until the ranks'
        # slices are added together (batch_statistics, then fold_statistics); in one process they
        # are folded at once. ``counted`` is False while the rank computes on a borrowed row.
        self.defer_statistics = False
        self.counted = True
        self._pending: list[tuple[str, list[Tensor]]] = []

    def config(self) -> dict[str, Any]:
        """The constructor arguments of this policy (plain JSON): rebuilds an equal, unbound one."""
        sch = self.schedule
        return {
            "regrow": self.regrow,
            "level": self.level,
            "interval": sch.interval,
            "fraction": sch.fraction,
            "decay": sch.decay,
            "stop": sch.stop,
            "window": self.window,
            "momentum": self.momentum,
        }

    @property
    def edges(self) -> bool:
        return self.level in ("edge", "both")

    @property
    def groups(self) -> bool:
        return self.level in ("group", "both")

    def bind(self, layer: RewiredLayer) -> None:
        """Size the statistics buffers for ``layer`` (called by the layer's constructor)."""
        if self.edges and layer.mask is None:
            raise ValueError("edge-level rewiring needs an edge mask: build the layer with edge_density < 1")
        if self.regrow == "hebbian":
            # The weight is (G_out, b_out, K * b_in): always three dimensions.
            shape = cast(tuple[int, int, int], tuple(layer.weight.shape)) if self.edges else None
            self.stats = ActivationStats(
                layer.groups_in, layer.groups_out, shape, layer.d_in, layer.d_out, self.momentum
            ).to(layer.weight.device)

    def set_progress(self, fraction: float) -> None:
        """Training hook: fraction of training done, in [0, 1]."""
        self.progress.fill_(fraction)

    def _next_due(self) -> bool:
        return self.schedule.due(int(self.step) + 1, float(self.progress))

    def _in_window(self) -> bool:
        interval = self.schedule.interval
        if interval == "epoch":  # random regrowth only: no statistics window
            return False
        step = int(self.step) + 1
        until = -step % interval  # steps from this one to the next update
        return until < self.window and float(self.progress) < self.schedule.stop

    @torch.no_grad()
    def observe(self, layer: RewiredLayer, x: Tensor, y: Tensor, w_eff: Tensor) -> None:
        """Called on every training forward with the input (N, d_in), output (N, d_out), masked weight."""
        if self.regrow == "hebbian" and self.stats is not None:
            xt, yt = x.detach().t(), y.detach().t()
            plan = layer.plan()
            ordered = xt if plan.inv_perm is None else xt.index_select(0, layer.in_perm)
            xg = ordered.reshape(layer.groups_in, layer.block_in, -1).mean(1)
            self._statistics(
                "groups", self.stats.group_sums(xg, yt.reshape(layer.groups_out, layer.block_out, -1).mean(1))
            )
            if self.stats.edges and self._in_window():
                gathered = xt.index_select(0, plan.fwd_rows).view(layer.groups_out, -1, xt.shape[1])
                self._statistics("edges", self.stats.edge_sums(xt, yt, gathered))
        if self.regrow == "gradient" and self._next_due():
            if self.groups and y.requires_grad:
                grads: list[Tensor] = []
                self._pairs.append((x.detach(), grads))
                y.register_hook(lambda g: grads.append(g.detach()))
            if self.edges and w_eff.requires_grad and w_eff is not layer.weight:
                w_eff.register_hook(self._keep_edge_grad)

    def _statistics(self, kind: str, sums: list[Tensor]) -> None:
        """Fold one forward's Hebbian sums now, or keep them for the ranks' sum (``defer_statistics``)."""
        if not self.counted:  # a borrowed row: the same collectives, nothing added
            sums = [torch.zeros_like(t) for t in sums]
        if self.defer_statistics:
            self._pending.append((kind, sums))
        else:
            self._fold(kind, sums)

    def _fold(self, kind: str, sums: list[Tensor]) -> None:
        assert self.stats is not None
        (self.stats.fold_groups if kind == "groups" else self.stats.fold_edges)(sums)

    def batch_statistics(self) -> list[Tensor]:
        """This step's Hebbian sums (``defer_statistics``), which data parallelism must *sum* over
        the ranks in place before :meth:`fold_statistics`: G2GNet's correlations are then those of
        the whole batch on every rank, and every rank regrows the edges one process would.

        Returns:
            Per training forward: the group sums (:meth:`ActivationStats.group_sums`) and, inside
            an edge window, the edge sums (:meth:`ActivationStats.edge_sums`). Empty unless
            ``regrow`` is ``hebbian``.
        """
        return [t for _, sums in self._pending for t in sums]

    def fold_statistics(self) -> None:
        """Fold the kept sums into the statistics, in the order of the forwards that made them."""
        for kind, sums in self._pending:
            self._fold(kind, sums)
        self._pending = []

    def _keep_edge_grad(self, g: Tensor) -> None:
        self._edge_grad = g.detach().clone() if self._edge_grad is None else self._edge_grad + g.detach()

    def batch_gradients(self) -> list[Tensor]:
        """This step's captured gradients, which data parallelism must average over the ranks.

        RigL scores edges and blocks by gradients this module captures itself (hooks on the
        masked weight and on the layer's output), not by ``.grad``, so DDP does not average them:
        a data-parallel wrapper averages these tensors in place after the backward (as DDP
        averages ``.grad``), and every rank then regrows the edges one process would on the
        whole batch. Empty on steps that capture nothing (not RigL, or no update due).

        Returns:
            RigL's (d_out, d_in) dense gradient (the captured (x, dy) pairs summed into it here)
            and (G_out, b_out, K * b_in) edge gradient, whichever were captured.
        """
        return [t for t in (self._summed_dense(), self._edge_grad) if t is not None]

    def _summed_dense(self) -> Tensor | None:
        """(d_out, d_in) dense dL/dW of the captured forwards, summed once (the pairs released)."""
        for x, grads in self._pairs:
            for gy in grads:
                g = gy.t() @ x  # (d_out, d_in): the dense gradient of this forward
                self._dense = g if self._dense is None else self._dense + g
        self._pairs = []
        return self._dense

    def _dense_block_grad(self, layer: RewiredLayer) -> Tensor:
        """(G_out, G_in) Frobenius norm of dL/dW_dense per block, from the captured (x, dy) pairs."""
        total = self._summed_dense()
        if total is None:
            raise RuntimeError("rewiring: no gradient was captured on the update step (was backward run?)")
        total = total.index_select(1, layer.in_perm)
        blocks = total.view(layer.groups_out, layer.block_out, layer.groups_in, layer.block_in)
        return blocks.square().sum((1, 3)).sqrt()

    @torch.no_grad()
    def update(self, layer: RewiredLayer) -> None:
        """After an optimizer step: count it and, when due, move edges and/or blocks."""
        if self._pending:
            raise RuntimeError(
                "rewiring: Hebbian sums of this step were kept for the ranks but never reduced"
                " (call DataParallel.finish_gradients after backward)"
            )
        self.step += 1
        step, progress = int(self.step), float(self.progress)
        if not self.schedule.due(step, progress):
            self._pairs, self._edge_grad, self._dense = [], None, None
            return
        self._move(layer, step, self.schedule.fraction_at(progress))

    @torch.no_grad()
    def epoch_end(self, layer: RewiredLayer) -> None:
        """At the end of a training epoch: SET's update (``interval="epoch"``), else nothing."""
        progress = float(self.progress)
        if self.schedule.due_at_epoch_end(progress):
            self._move(layer, int(self.step), self.schedule.fraction_at(progress))

    def _move(self, layer: RewiredLayer, step: int, frac: float) -> None:
        """Drop and regrow ``frac`` of the active edges and/or connected blocks."""
        gen = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + step)
        moved_edges = moved_blocks = 0
        grown = torch.zeros(layer.weight.shape, dtype=torch.bool, device=layer.weight.device)
        if self.edges:
            assert layer.mask is not None
            n = round(frac * int(layer.mask.sum()))
            before = layer.mask.clone()
            moved_edges = swap_edges(layer.weight.data, layer.mask, n, self._edge_score(layer), gen)
            grown |= layer.mask & ~before
        if self.groups:
            n = round(frac * layer.sources.numel())
            moves = swap_blocks(
                layer.sources, layer.groups_in, self._block_magnitude(layer), n, self._group_score(layer), gen
            )
            self._apply_block_moves(layer, moves)
            moved_blocks = len(moves)
            slots = grown.view(layer.groups_out, layer.block_out, layer.k, layer.block_in)
            for o, j, _ in moves:
                slots[o, :, j] = True
        self._regrown = grown if (moved_edges or moved_blocks) else None
        if self.stats is not None and self.stats.edges:
            self.stats.reset_edges()
        self._pairs, self._edge_grad, self._dense = [], None, None
        self.edges_moved += moved_edges
        self.blocks_moved += moved_blocks
        self.record = {"step": step, "fraction": frac, "edges_moved": moved_edges, "blocks_moved": moved_blocks}

    def pop_regrown(self) -> Tensor | None:
        """(G_out, b_out, K) bool: weight positions regrown by the last update, or None; once."""
        grown, self._regrown = self._regrown, None
        return grown

    def _edge_score(self, layer: RewiredLayer) -> Tensor | None:
        if self.regrow == "gradient":
            if self._edge_grad is None:
                raise RuntimeError("rewiring: no weight gradient was captured on the update step")
            return self._edge_grad.abs()
        if self.regrow == "hebbian":
            assert self.stats is not None
            return self.stats.edge_correlation(layer.plan().fwd_rows).abs()
        return None

    def _group_score(self, layer: RewiredLayer) -> Tensor | None:
        if self.regrow == "gradient":
            return self._dense_block_grad(layer)
        if self.regrow == "hebbian":
            assert self.stats is not None
            return self.stats.group_correlation().abs()
        return None

    @staticmethod
    def _block_magnitude(layer: RewiredLayer) -> Tensor:
        """(G_out, k) RMS of each connected block's active weights."""
        w = layer.effective_weight().detach()
        blocks = w.view(layer.groups_out, layer.block_out, layer.k, layer.block_in)
        sq = blocks.square().sum((1, 3))
        if layer.mask is None:
            return (sq / (layer.block_out * layer.block_in)).sqrt()
        count = layer.mask.view_as(blocks).sum((1, 3)).clamp_min(1)
        return (sq / count).sqrt()

    @staticmethod
    def _apply_block_moves(layer: RewiredLayer, moves: list[tuple[int, int, int]]) -> None:
        """Point each moved slot at its new input group and zero its weights (RigL: grown at zero).

        The slot keeps its edge-mask pattern, so the edge density is unchanged.
        """
        if not moves:
            return
        w = layer.weight.data.view(layer.groups_out, layer.block_out, layer.k, layer.block_in)
        for o, j, g in moves:
            layer.sources[o, j] = g
            w[o, :, j].zero_()
