"""Stages for depth operations on a trained stack: skip / loop chains, layer importance.

Every model or sub-model a stage measures becomes a point ``{label, accuracy, flops,
latency_us, ...}`` (:func:`brickwork.analysis.tradeoff.measure_point`); a stage plots its own
points against FLOPs and against measured latency, Pareto front marked, and adds the key ones
to ``ctx.points`` (the run's overall plot).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

import pydantic
from pydantic import Field
from pydantic.dataclasses import dataclass

from brickwork.analysis.compute import stack_flops
from brickwork.analysis.pareto import pareto_front
from brickwork.analysis.tradeoff import measure_point
from brickwork.data.batching import input_batches
from brickwork.errors import ConfigError
from brickwork.experiment.context import SplitName, StageContext
from brickwork.experiment.report import POINT_COLUMNS, tradeoff_section
from brickwork.experiment.report import markdown_table as table
from brickwork.nn.stack import stack_of
from brickwork.ops.chain import (
    ChainModel,
    Part,
    beam_search_chain,
    chain_correct,
    chain_cost,
    drop_attention,
    drop_layers,
    enumerate_chains,
    has_attention,
    layer_importance,
    least_important,
    mcts_cheapest_chain,
    per_sample_oracle,
)
from brickwork.registry import Flatten, register

# -- stages -------------------------------------------------------------------------------------


@dataclass(frozen=True, config=pydantic.ConfigDict(extra="forbid"))
class ChainSearch:
    """How the ``chains`` stage searches: beam search or Monte Carlo tree search, and each one's budget.

    Attributes:
        search: ``beam`` (:func:`~brickwork.ops.chain.beam_search_chain`) or ``mcts``
            (:func:`~brickwork.ops.chain.mcts_cheapest_chain`).
        beam: beam width (beam search only).
        evaluations: chains scored at most (MCTS only).
        exploration: UCB exploration constant (MCTS only).
    """

    search: Literal["beam", "mcts"] = "beam"
    beam: Annotated[int, pydantic.Field(ge=1)] = 4
    evaluations: Annotated[int, pydantic.Field(ge=1)] = 40
    exploration: Annotated[float, pydantic.Field(ge=0)] = 1.0

    def check(self, path: str = "") -> None:
        """Reject a setting the chosen search does not use unless it is at its default.

        Raises:
            ConfigError: naming the key, e.g. ``stages[1].evaluations``.
        """
        default = ChainSearch()
        unused = ("evaluations", "exploration") if self.search == "beam" else ("beam",)
        for name in unused:
            value = getattr(self, name)
            if value != getattr(default, name):
                other = "mcts" if self.search == "beam" else "beam"
                raise ConfigError(
                    f"{path}.{name}" if path else name,
                    f"is a setting of search {other!r}, unused with search {self.search!r}; set "
                    f"search: {other} or leave it at its default {getattr(default, name)!r}",
                    value,
                )


_BEAM = ChainSearch()  # frozen: safe to share as a default


def _chain_label(chain: Sequence[int]) -> str:
    return "[" + ",".join(map(str, chain)) + "]"


@register("stage", "chains")
def chains(
    ctx: StageContext,
    /,
    max_drop: Annotated[float, Field(ge=0, lt=1)] = 0.01,
    chain_search: Annotated[ChainSearch, Flatten] = _BEAM,
    max_repeat: Annotated[int, Field(ge=1)] = 2,
    search_samples: Annotated[int, Field(ge=1)] = 1024,
    oracle_samples: Annotated[int, Field(ge=0)] = 256,
    max_candidates: Annotated[int, Field(ge=1)] = 729,
    split: SplitName = "test",
    batch_size: Annotated[int, Field(ge=1)] = 256,
    latency_repeats: Annotated[int, Field(ge=1)] = 5,
) -> None:
    """Skip or loop layers: the cheapest chain of layers within an accuracy budget, and per sample.

    Beam search (``search: beam``, width ``beam``) or Monte Carlo tree search (``search: mcts``:
    ``ops.chain.mcts_cheapest_chain``, at most ``evaluations`` chains scored, UCB constant
    ``exploration``, seeded by the run's seed; simplified against Li et al., 2025: one search for
    the data set; :class:`ChainSearch` refuses the other search's settings) on validation data
    for the cheapest chain within ``max_drop`` of the full chain's accuracy; the Pareto-optimal
    chains it explored are measured on ``split``; then the per-sample oracle (the best chain for
    each sample) over all bounded chains.
    """
    search, beam = chain_search.search, chain_search.beam
    evaluations, exploration = chain_search.evaluations, chain_search.exploration
    model = stack_of(ctx.model)
    n = len(model.body)
    val, test = ctx.data.val, getattr(ctx.data, split)
    xv, yv = val.x[:search_samples].to(ctx.device), val.y[:search_samples].to(ctx.device)
    costs = stack_flops(model, xv[:batch_size]).layers
    full = tuple(range(n))
    full_acc = float(chain_correct(model, full, xv, yv, batch_size).mean())
    if search == "mcts":
        best, explored = mcts_cheapest_chain(
            model,
            xv,
            yv,
            min_accuracy=full_acc - max_drop,
            evaluations=evaluations,
            costs=costs,
            exploration=exploration,
            max_repeat=max_repeat,
            batch_size=batch_size,
            seed=ctx.seed,
        )
        searched = f"MCTS (budget {evaluations} chains, c = {exploration}, each layer at most {max_repeat}x)"
    else:
        best, explored = beam_search_chain(
            model,
            xv,
            yv,
            min_accuracy=full_acc - max_drop,
            costs=costs,
            beam=beam,
            max_repeat=max_repeat,
            batch_size=batch_size,
        )
        searched = f"Beam search (beam {beam}, each layer at most {max_repeat}x)"
    front = [explored[i] for i in pareto_front([r.cost for r in explored], [r.accuracy for r in explored])]
    chosen = {r.chain: r for r in [*front, best]}
    chosen.setdefault(full, next(r for r in explored if r.chain == full))
    points = []
    for chain in sorted(chosen, key=lambda c: chain_cost(c, costs)):
        p = measure_point(
            ChainModel(model, chain),
            test,
            f"chain {_chain_label(chain)}",
            batch_size=batch_size,
            device=ctx.device,
            latency_repeats=latency_repeats,
            val_accuracy=chosen[chain].accuracy,
            chain=list(chain),
        )
        points.append(p)
    full_point = next(p for p in points if tuple(p["chain"]) == full)
    best_point = next(p for p in points if tuple(p["chain"]) == best.chain)
    ctx.metrics.update(
        chain_best=_chain_label(best.chain),
        chain_flops_saving=1 - best_point["flops"] / full_point["flops"],
        chain_accuracy_drop=full_point["accuracy"] - best_point["accuracy"],
        chain_search=search,
        chains_evaluated=len(explored),
    )
    ctx.points.extend([best_point] if best.chain != full else [])
    report = [
        f"### Skip or loop layers ({split}; chains searched on {len(xv)} validation samples)",
        f"{searched} explored {len(explored)} chains; "
        f"required validation accuracy {full_acc - max_drop:.4f} (full chain {full_acc:.4f} - {max_drop}). "
        f"Best: {_chain_label(best.chain)}. Below: the Pareto-optimal chains on validation, measured on {split}.",
        table(points, [*POINT_COLUMNS[:4], ("val_accuracy", "val accuracy", "{:.4f}")]),
        *tradeoff_section(ctx, points, "chains", "Chains of layers"),
    ]
    if oracle_samples:
        cands = enumerate_chains(n, max_repeat)
        exhaustive = len(cands) <= max_candidates
        cands = cands if exhaustive else [r.chain for r in explored]
        xo, yo = test.x[:oracle_samples].to(ctx.device), test.y[:oracle_samples].to(ctx.device)
        oracle = per_sample_oracle(model, xo, yo, cands, costs, batch_size)
        shorter = float((oracle.relative_cost < 1).float().mean())
        improved = float((oracle.oracle_correct > oracle.full_correct).float().mean())
        ctx.metrics.update(
            chain_oracle_accuracy=float(oracle.oracle_correct.mean()),
            chain_oracle_relative_flops=float(oracle.relative_cost.mean()),
        )
        unit = "per-token accuracy on it" if yo.dim() > 1 else "its answer right"
        report += [
            f"Per-sample oracle on {len(xo)} {split} samples over "
            f"{'all ' if exhaustive else 'the explored '}{len(cands)} chains. Cheapest chain keeping "
            f"{unit} at least as high as the full chain's: a cheaper one exists for {shorter:.1%} of the "
            f"samples, {float(oracle.relative_cost.mean()):.1%} of the full chain's body FLOPs on average. "
            f"Most accurate chain: better than the full chain for {improved:.1%} of the samples, accuracy "
            f"{float(oracle.oracle_correct.mean()):.4f} against {float(oracle.full_correct.mean()):.4f}. "
            "(An oracle knows the labels: an upper bound for a per-sample chain router, "
            "not a deployable model.)"
        ]
    ctx.report.extend(report)


@register("stage", "layer_importance")
def layer_importance_stage(
    ctx: StageContext,
    /,
    parts: list[Part] = ["block", "attention"],  # noqa: B006 - read only
    max_drop_layers: Annotated[int, Field(ge=1)] | None = None,
    samples: Annotated[int, Field(ge=1)] = 512,
    split: SplitName = "test",
    batch_size: Annotated[int, Field(ge=1)] = 256,
    latency_repeats: Annotated[int, Field(ge=1)] = 5,
) -> None:
    """Score layers by 1 - cos(input, output) and measure the model with the least important dropped.

    Scores blocks (or only their attention sublayers) on validation data, then drops the 1, 2,
    ... least important and measures each pruned model on ``split``.
    """
    model = stack_of(ctx.model)
    n = len(model.body)
    test = getattr(ctx.data, split)
    points = [
        measure_point(model, test, "full", batch_size=batch_size, device=ctx.device, latency_repeats=latency_repeats)
    ]
    rows: list[dict[str, Any]] = []
    for part in parts:
        if part == "attention" and not any(has_attention(m) for m in model.body.layers):
            continue
        scores = layer_importance(
            model, input_batches(ctx.data.val.x, batch_size, limit=samples, device=ctx.device), part
        )
        rows += [{"part": part, "layer": i, "importance": s} for i, s in enumerate(scores)]
        droppable = sum(s == s for s in scores)
        for k in range(1, min(droppable, max_drop_layers or n - 1) + 1):
            drop = least_important(scores, k)
            pruned = drop_layers(model, drop) if part == "block" else drop_attention(model, drop)
            points.append(
                measure_point(
                    pruned,
                    test,
                    f"-{part} {_chain_label(drop)}",
                    batch_size=batch_size,
                    device=ctx.device,
                    latency_repeats=latency_repeats,
                )
            )
    ctx.points.extend(points[1:])
    ctx.report.extend(
        [
            f"### Layer importance (1 - cos(input, output), {samples} validation samples)",
            table(rows, [("part", "part", "{}"), ("layer", "layer", "{}"), ("importance", "importance", "{:.4f}")]),
            f"Dropping the least important blocks or attention sublayers, measured on {split}:",
            table(points, POINT_COLUMNS),
            *tradeoff_section(ctx, points, "importance", "Dropped layers"),
        ]
    )
