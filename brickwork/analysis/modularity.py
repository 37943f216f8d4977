"""How modular a trained FFN already is, and how the experts of an MoEfied one specialise.

* **Co-activation graph** of a layer's neurons on real text: edge weight = number of tokens on
  which both neurons fire (MoEfication's graph, Zhang et al., 2022).
* **Newman modularity** ``Q = sum_c [ e_c / 2m - (a_c / 2m)^2 ]`` of a partition of that graph
  (Newman & Girvan, 2004), with ``e_c`` the edge weight inside group c (counted both ways),
  ``a_c`` its total degree and ``2m`` the total degree. Q is compared with random partitions of
  the same group sizes: a partition that only reflects chance scores near 0, so the gap is the
  emergent modularity that Configurable Foundation Models and EMoE (Qiu et al., 2024) report.
* **Expert specialisation**: which experts the tokens of each class are routed to
  (:func:`brickwork.analysis.routing.class_expert_counts`), summarised per layer by the
  Jensen-Shannon divergence between the classes' routing distributions, against the same
  divergence with the labels shuffled (what finite samples give with no specialisation).

Reads models and activations; never changes a model.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from brickwork.analysis.clustering import coactivation_counts, partition_to_labels, random_partition
from brickwork.analysis.routing import class_expert_counts, specialisation
from brickwork.nn.modes import evaluating
from brickwork.nn.records import collect_records
from brickwork.nn.routing.types import RoutingRecord


def newman_modularity(adj: Tensor, labels: Tensor) -> float:
    """Newman modularity Q of the partition ``labels`` (H,) of the weighted graph ``adj`` (H, H)."""
    a = adj.double()
    groups = int(labels.max()) + 1
    s = torch.nn.functional.one_hot(labels.long(), groups).double()  # (H, C)
    two_m = a.sum()
    inside = torch.diagonal(s.t() @ a @ s)  # (C,) edge weight within each group, both directions
    degree = s.t() @ a.sum(1)  # (C,) total degree of each group
    return float((inside / two_m - (degree / two_m) ** 2).sum())


def random_modularity(adj: Tensor, num_groups: int, trials: int = 20, seed: int = 0) -> tuple[float, float]:
    """Mean and standard deviation of Q over random equal-size partitions into ``num_groups``."""
    qs = torch.tensor(
        [
            newman_modularity(adj, partition_to_labels(random_partition(adj.shape[0], num_groups, seed + t)))
            for t in range(trials)
        ]
    )
    return float(qs.mean()), float(qs.std())


def layer_modularity(fired: Tensor, partitions: dict[str, Tensor], trials: int = 20, seed: int = 0) -> dict[str, float]:
    """Q of each named partition (E, H/E) of the co-activation graph of ``fired`` (N, H), and the
    random baseline ``random`` / ``random_std`` at the first partition's number of groups; also
    ``density``, the mean share of neurons firing per token."""
    adj = coactivation_counts(fired)
    out = {name: newman_modularity(adj, partition_to_labels(p)) for name, p in partitions.items()}
    groups = next(iter(partitions.values())).shape[0]
    out["random"], out["random_std"] = random_modularity(adj, groups, trials, seed)
    out["density"] = float(fired.double().mean())
    return out


def js_divergence(p: Tensor, q: Tensor) -> float:
    """Jensen-Shannon divergence (nats) between two distributions over experts."""
    p, q = p.double() / p.sum(), q.double() / q.sum()
    m = (p + q) / 2

    def kl(a: Tensor, b: Tensor) -> Tensor:
        keep = a > 0
        return (a[keep] * (a[keep] / b[keep]).log()).sum()

    return float((kl(p, m) + kl(q, m)) / 2)


@torch.no_grad()
def routing_by_class(
    model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], num_classes: int, seed: int = 0
) -> dict[str, dict[str, Tensor | float]]:
    """Per routed layer: the (classes, E) routing fractions, and the class divergence against a
    shuffled-label baseline from the same forward passes.

    Args:
        model: a model with routed layers (run in eval mode; restored after).
        batches: ``(inputs, labels (B,))``, padding-free so that padded positions are not counted.
        num_classes: number of classes.
        seed: the label shuffle.

    Returns:
        ``{path: {"fractions": (C, E) tensor, "js": float, "js_shuffled": float}}``; the JS values
        are for the first two classes.
    """
    g = torch.Generator().manual_seed(seed)
    true: dict[str, Tensor] = {}
    shuffled: dict[str, Tensor] = {}
    with evaluating(model):
        for x, y in batches:
            model(x)
            y_perm = y[torch.randperm(len(y), generator=g)]
            for path, rec in collect_records(model).items():
                if isinstance(rec, RoutingRecord):
                    for acc, lab in ((true, y), (shuffled, y_perm)):
                        c = class_expert_counts(rec, lab, num_classes)
                        acc[path] = acc[path] + c if path in acc else c
    return {
        path: {
            "fractions": specialisation(c),
            "js": js_divergence(c[0], c[1]),
            "js_shuffled": js_divergence(shuffled[path][0], shuffled[path][1]),
        }
        for path, c in true.items()
    }


def plot_coactivation(adj: Tensor, labels: Tensor, path: str | Path, *, title: str = "") -> Path:
    """Co-activation matrix with neurons ordered by group (blocks on the diagonal = modularity).

    Each entry is shown as ``A_ij / sqrt(k_i k_j)`` (degree-normalised), so frequently firing
    neurons do not dominate the picture.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    order = torch.argsort(labels * labels.numel() + torch.arange(labels.numel()))
    a = adj.double()[order][:, order]
    k = a.sum(1).clamp_min(1e-12)
    img = (a / torch.sqrt(k[:, None] * k[None, :])).numpy()
    fig = Figure(figsize=(5.2, 4.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(img, cmap="magma", vmax=float(torch.quantile(torch.from_numpy(img).flatten()[::97], 0.99)))
    ax.set(title=title or "neuron co-activation", xlabel="neuron (grouped by expert)", ylabel="neuron")
    fig.colorbar(im, ax=ax, label="A_ij / sqrt(k_i k_j)")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


def plot_modularity(rows: list[dict[str, float]], keys: list[str], path: str | Path) -> Path:
    """Grouped bars of Q per layer for the partitions ``keys`` (``random`` drawn with its std)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(keys)
    for j, key in enumerate(keys):
        xs = [r["layer"] + (j - (len(keys) - 1) / 2) * width for r in rows]
        err = [r.get(f"{key}_std", 0.0) for r in rows]
        ax.bar(xs, [r[key] for r in rows], width, yerr=err if any(err) else None, label=key, capsize=2)
    ax.set(xlabel="layer", ylabel="Newman modularity Q", title="Modularity of the neuron co-activation graph")
    ax.set_xticks([r["layer"] for r in rows])
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


@torch.no_grad()
def fired_neurons(ffn: nn.Module, x: Tensor) -> Tensor:
    """(N, H) bool: which of the FFN's H neurons fire (pre-activation > 0) on its inputs ``x`` (N, D).

    ``ffn`` has an ``up`` linear layer (:class:`~brickwork.nn.FeedForward`).
    """
    up = cast(nn.Linear, ffn.up)
    return torch.nn.functional.linear(x, up.weight, up.bias) > 0


def plot_partition_coactivation(fired: Tensor, partition: Tensor, path: str | Path, *, title: str = "") -> Path:
    """:func:`plot_coactivation` of the co-activation graph of ``fired`` (N, H), neurons ordered by
    the groups of ``partition`` (E, H/E)."""
    return plot_coactivation(coactivation_counts(fired), partition_to_labels(partition), path, title=title)


def specialisation_rows(spec: dict[str, dict[str, Tensor | float]]) -> list[dict[str, Any]]:
    """``[{"layer", "js", "js_shuffled"}]`` per routed layer of :func:`routing_by_class`'s result,
    in layer order (paths ``body.layers.<i>...``)."""
    return [
        {"layer": _layer(p), "js": spec[p]["js"], "js_shuffled": spec[p]["js_shuffled"]}
        for p in sorted(spec, key=_layer)
    ]


def plot_specialisation(spec: dict[str, dict[str, Tensor | float]], class_names: list[str], path: str | Path) -> Path:
    """Heatmap of :func:`routing_by_class`'s fractions: one row per (layer, class), one column per expert."""
    from brickwork.analysis.routing import plot_routing_heatmap

    paths = sorted(spec, key=_layer)
    mat = torch.cat([spec[p]["fractions"] for p in paths])  # type: ignore[misc]
    names = [f"L{_layer(p)} {c}" for p in paths for c in class_names]
    return Path(
        plot_routing_heatmap(
            mat,
            path,
            row_names=names,
            row_label="layer, class",
            title="share of each class's tokens routed to each expert",
        )
    )


def _layer(path: str) -> int:
    return int(path.split(".")[2])
