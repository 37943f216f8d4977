"""Routing statistics of routed layers: load, drops, entropy, expert specialisation, heatmaps.

Reads the :class:`~brickwork.nn.routing.types.RoutingRecord` every routed layer leaves after a
forward (collected model-wide with :func:`brickwork.nn.records.collect_records`); never changes
the model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from brickwork.nn.modes import evaluating
from brickwork.nn.records import collect_records
from brickwork.nn.routing.types import RoutingRecord


@dataclass
class RoutingStats:
    """Summary of one routed layer's latest forward.

    Attributes:
        load: (E,) assignments processed per expert.
        load_fraction: (E,) share of processed assignments per expert.
        imbalance: max load / mean load (1.0 = perfectly balanced).
        drop_rate: fraction of assignments dropped by capacity.
        unrouted_tokens: tokens no expert processed.
        entropy: mean router entropy per token in nats (None for parameter-free routers).
        dead_experts: experts that processed nothing.
    """

    load: Tensor
    load_fraction: Tensor
    imbalance: float
    drop_rate: float
    unrouted_tokens: int
    entropy: float | None
    dead_experts: int


def routing_stats(record: RoutingRecord) -> RoutingStats:
    """Summarise one :class:`RoutingRecord`."""
    load = record.load.detach().cpu()
    mean = float(load.double().mean()) if load.numel() else 0.0
    return RoutingStats(
        load=load,
        load_fraction=record.load_fraction.cpu(),
        imbalance=float(load.max()) / mean if mean > 0 else 0.0,
        drop_rate=record.drop_rate,
        unrouted_tokens=record.unrouted_tokens,
        entropy=record.entropy,
        dead_experts=int((load == 0).sum()),
    )


def routing_summary(model: nn.Module) -> dict[str, RoutingStats]:
    """:class:`RoutingStats` of every routed layer of ``model`` from its latest forward, by module path."""
    return {path: routing_stats(rec) for path, rec in collect_records(model).items() if isinstance(rec, RoutingRecord)}


def token_labels(record: RoutingRecord, labels: Tensor) -> Tensor:
    """Label of every routed token, (N,).

    Args:
        record: the layer's record.
        labels: per sample (B,) (broadcast over the sample's tokens, e.g. the T positions of a
            (B, T, D) input) or per token with the input's leading shape (e.g. (B, T)).
    """
    labels = labels.to(record.token_idx.device).long()
    if labels.numel() == record.num_tokens:
        return labels.reshape(-1)
    if labels.dim() == 1 and record.num_tokens % labels.numel() == 0:
        return labels.repeat_interleave(record.num_tokens // labels.numel())
    raise ValueError(
        f"token_labels: {labels.numel()} labels do not fit {record.num_tokens} tokens of shape {record.leading_shape}"
    )


def class_expert_counts(record: RoutingRecord, labels: Tensor, num_classes: int) -> Tensor:
    """(classes, E) processed assignments from tokens of each class to each expert."""
    per_token = token_labels(record, labels)
    kept = record.kept
    cls = per_token[record.token_idx[kept]]
    flat = cls * record.num_experts + record.expert_idx[kept]
    counts = torch.bincount(flat, minlength=num_classes * record.num_experts)
    return counts.reshape(num_classes, record.num_experts).cpu()


def specialisation(counts: Tensor) -> Tensor:
    """Row-normalised (classes, E) matrix: the fraction of each class's routing that goes to each expert."""
    counts = counts.double()
    return counts / counts.sum(dim=1, keepdim=True).clamp_min(1)


@torch.no_grad()
def expert_specialisation(
    model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], num_classes: int
) -> dict[str, Tensor]:
    """Per routed layer, the (classes, E) routing-fraction matrix over a labelled data set.

    Runs ``model`` in eval mode on every ``(inputs, labels)`` batch and accumulates, for each
    layer, which experts the tokens of each class were sent to. Rows sum to 1 (a row of zeros
    for a class that never occurred).

    Args:
        model: any model containing routed layers.
        batches: ``(inputs, labels)`` with labels per sample (B,) or per token.
        num_classes: number of classes.

    Returns:
        ``{module path: (num_classes, E) float64 tensor}``.
    """
    totals: dict[str, Tensor] = {}
    with evaluating(model):
        for inputs, labels in batches:
            model(inputs)
            for path, rec in collect_records(model).items():
                if isinstance(rec, RoutingRecord):
                    c = class_expert_counts(rec, labels, num_classes)
                    totals[path] = totals[path] + c if path in totals else c
    return {path: specialisation(c) for path, c in totals.items()}


def plot_routing_heatmap(
    matrix: Tensor,
    path: str | Path,
    *,
    title: str = "expert specialisation",
    row_label: str = "class",
    col_label: str = "expert",
    row_names: list[str] | None = None,
) -> Path:
    """Write a heatmap PNG of a (rows, E) matrix (e.g. :func:`expert_specialisation`'s output).

    Draws on a bare ``matplotlib.figure.Figure`` (Agg canvas): no display, no pyplot state,
    and no change to the session's matplotlib backend.

    Returns:
        The path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data = matrix.detach().double().cpu().numpy()
    rows, cols = data.shape
    fig = Figure(figsize=(min(2 + 0.35 * cols, 18), min(1.5 + 0.35 * rows, 12)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0.0)
    ax.set_xlabel(col_label)
    ax.set_ylabel(row_label)
    ax.set_title(title)
    if cols <= 32:
        ax.set_xticks(range(cols))
    ax.set_yticks(range(rows))
    if row_names is not None:
        ax.set_yticklabels(row_names)
    fig.colorbar(im, ax=ax, label="fraction of routing")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out
