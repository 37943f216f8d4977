"""The ``routing`` stage: expert load and specialisation of every routed layer, with heatmaps."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from brickwork.analysis.routing import expert_specialisation, plot_routing_heatmap, routing_stats
from brickwork.experiment.context import SplitName, StageContext
from brickwork.nn.records import collect_records
from brickwork.nn.routing.token_hash import balance_token_hash
from brickwork.nn.routing.types import RoutingRecord
from brickwork.registry import register


@register("stage", "routing")
def routing_stage(
    ctx: StageContext,
    /,
    split: SplitName = "test",
    batch_size: Annotated[int, Field(ge=1)] = 256,
    max_samples: Annotated[int, Field(ge=1)] = 2048,
) -> None:
    """Expert load (imbalance, drops, dead experts, entropy) and class-by-expert routing heatmaps."""
    data = getattr(ctx.data, split)
    n = min(len(data), max_samples)
    batches = [
        (data.x[i : min(i + batch_size, n)].to(ctx.device), data.y[i : min(i + batch_size, n)].to(ctx.device))
        for i in range(0, n, batch_size)
    ]
    spec = expert_specialisation(ctx.model, batches, ctx.data.num_classes)
    if not spec:
        return
    with torch.no_grad():
        ctx.model.eval()
        ctx.model(batches[0][0])
    rows = [
        "| layer | imbalance (max/mean load) | dropped | dead experts | router entropy (nats) | "
        "specialisation (mean max share per class) |",
        "|---|---|---|---|---|---|",
    ]
    images = []
    for path, matrix in spec.items():
        rec = collect_records(ctx.model)[path]
        assert isinstance(rec, RoutingRecord)
        st = routing_stats(rec)
        peak = float(matrix.max(dim=1).values.mean())
        entropy = "" if st.entropy is None else f"{st.entropy:.3f}"
        rows.append(
            f"| {path} | {st.imbalance:.2f} | {st.drop_rate:.3f} | {st.dead_experts} | {entropy} | {peak:.3f} |"
        )
        out = ctx.dir / f"routing-{path.replace('.', '_')}.png"
        names = ctx.data.classes if ctx.data.task == "classify" and len(ctx.data.classes) <= 20 else None
        plot_routing_heatmap(matrix, out, title=f"{ctx.label}: {path}", row_names=names)
        images.append(f"![{path}]({out.relative_to(ctx.run_dir)})")
        ctx.metrics[f"routing.{path}.imbalance"] = st.imbalance
    ctx.report += [
        "Routing on the " + split + " split (first batch for load; all for specialisation):",
        "\n".join(rows),
        *images,
    ]


@register("stage", "hash_balance")
def hash_balance_stage(ctx: StageContext, /) -> None:
    """Build Roller et al.'s frequency-balanced hash table from the train split's token ids.

    Every ``token_hash_frequency`` router of the model gets it (ids sorted by frequency, each to
    the expert with the least total frequency so far); other models pass through unchanged. Run
    it before ``train``: such a router refuses to train without its table.
    """
    n = balance_token_hash(ctx.model, ctx.data.train.x)
    ctx.metrics["hash_balanced_routers"] = n
    if n:
        ctx.report.append(f"Frequency-balanced hash tables (Roller et al., 2021) built for {n} router(s).")
