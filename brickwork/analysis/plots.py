"""Plots a person would rather look at than read: training curves, accuracy against compute,
early-exit threshold sweeps, loss and accuracy along linear paths between models.

Uses matplotlib's Agg backend (files only, no display needed). matplotlib is imported on the first
plot, not with this module: it is half a second of every command's start-up otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from brickwork.analysis.pareto import pareto_front

if TYPE_CHECKING:
    from brickwork.analysis.connectivity import LinearPath


def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _no_minor_labels(axis: Any) -> None:
    from matplotlib.ticker import NullFormatter

    axis.set_minor_formatter(NullFormatter())  # minor labels overlap on short ranges


def plot_curves(histories: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path) -> Path:
    """Training loss and validation accuracy per epoch, one line per model variant."""
    fig, (ax_loss, ax_acc) = _pyplot().subplots(1, 2, figsize=(10, 4))
    for label, rows in histories.items():
        if not rows:
            continue
        epochs = [r["epoch"] for r in rows]
        ax_loss.plot(epochs, [r["train_loss"] for r in rows], marker=".", label=label)
        if "val_accuracy" in rows[0]:
            ax_acc.plot(epochs, [r["val_accuracy"] for r in rows], marker=".", label=label)
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="Training loss")
    ax_acc.set(xlabel="epoch", ylabel="validation accuracy", title="Validation accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_accuracy_vs_flops(points: Sequence[Mapping[str, Any]], path: str | Path, *, title: str = "") -> Path:
    """Accuracy against FLOPs per sample (log scale), each point labelled, Pareto front drawn."""
    return plot_accuracy_vs(
        points, path, x_key="flops", x_label="FLOPs executed per sample", title=title or "Accuracy against compute"
    )


def plot_accuracy_vs(
    points: Sequence[Mapping[str, Any]], path: str | Path, *, x_key: str, x_label: str, title: str
) -> Path:
    """Accuracy against any cost ``points[x_key]`` (FLOPs, latency; log scale), each point
    labelled, the Pareto front dashed, error bars where points carry ``accuracy_std``."""
    fig, ax = _pyplot().subplots(figsize=(6.5, 4.5))
    xs = [float(p[x_key]) for p in points]
    acc = [float(p["accuracy"]) for p in points]
    err = [float(p.get("accuracy_std", 0.0)) for p in points]
    if any(err):  # mean over seeds, with one standard deviation
        ax.errorbar(xs, acc, yerr=err, fmt="none", ecolor="gray", capsize=3, zorder=2)
    ax.scatter(xs, acc, s=36, zorder=3)
    for p, x, y in zip(points, xs, acc, strict=True):
        ax.annotate(str(p["label"]), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    front = pareto_front(xs, acc)
    ax.plot(
        [xs[i] for i in front], [acc[i] for i in front], "--", color="tab:red", lw=1.2, label="Pareto front", zorder=2
    )
    ax.set_xscale("log")
    _no_minor_labels(ax.xaxis)
    ax.set(xlabel=x_label, ylabel="accuracy", title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_exit_curves(
    curves: Mapping[str, Sequence[Mapping[str, Any]]],
    marks: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    x_key: str,
    x_label: str,
    title: str,
) -> Path:
    """One accuracy-against-cost curve per exit policy (a threshold sweep, the ``chosen`` point
    starred), fixed exits (every sample at one exit) as labelled marks, Pareto front of all dashed."""
    fig, ax = _pyplot().subplots(figsize=(6.5, 4.5))
    every = [p for ps in curves.values() for p in ps] + list(marks)
    for name, ps in curves.items():
        ps = sorted(ps, key=lambda p: p[x_key])
        ax.plot([p[x_key] for p in ps], [p["accuracy"] for p in ps], marker=".", label=f"{name} threshold sweep")
        star = [p for p in ps if p.get("chosen")]
        ax.scatter([p[x_key] for p in star], [p["accuracy"] for p in star], marker="*", s=160, zorder=4)
    ax.scatter(
        [p[x_key] for p in marks],
        [p["accuracy"] for p in marks],
        marker="s",
        color="k",
        s=25,
        zorder=3,
        label="every sample at one exit",
    )
    for p in marks:
        ax.annotate(p["label"], (p[x_key], p["accuracy"]), textcoords="offset points", xytext=(4, -10), fontsize=7)
    xs, ys = [p[x_key] for p in every], [p["accuracy"] for p in every]
    front = pareto_front(xs, ys)
    ax.plot([xs[i] for i in front], [ys[i] for i in front], "--", color="tab:red", lw=1, label="Pareto front")
    ax.set_xscale("log")
    ax.set(xlabel=x_label, ylabel="accuracy", title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_linear_paths(paths: Mapping[str, LinearPath], path: str | Path, *, title: str = "") -> Path:
    """Loss and accuracy along linear paths between models (before and after alignment on one figure).

    Args:
        paths: one :class:`~brickwork.analysis.connectivity.LinearPath` per curve, by legend label
            (e.g. ``{"naive": ..., "weight matching": ...}``); the legend gives each loss barrier.
        path: the image file to write.
    """
    fig, (ax_loss, ax_acc) = _pyplot().subplots(1, 2, figsize=(10, 4))
    for label, p in paths.items():
        ax_loss.plot(p.alphas, p.loss, marker=".", label=f"{label} (barrier {p.loss_barrier:.3f})")
        ax_acc.plot(p.alphas, p.accuracy, marker=".", label=f"{label} (barrier {p.accuracy_barrier:.3f})")
    ax_loss.set(xlabel="interpolation weight of model b", ylabel="loss", title="Loss along the linear path")
    ax_acc.set(xlabel="interpolation weight of model b", ylabel="accuracy", title="Accuracy along the linear path")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def plot_metric_against(
    series: Mapping[str, Sequence[tuple[float, float]]],
    path: str | Path,
    *,
    x_label: str,
    y_label: str,
    title: str,
) -> Path:
    """One line of ``(x, metric)`` points per series (a sweep axis, the other axes held fixed);
    the x axis is logarithmic when every x is positive and they span a factor of 10 or more."""
    fig, ax = _pyplot().subplots(figsize=(6.5, 4.5))
    xs = [x for pts in series.values() for x, _ in pts]
    for name, pts in series.items():
        pts = sorted(pts)
        ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", label=name)
    if xs and min(xs) > 0 and max(xs) >= 10 * min(xs):
        ax.set_xscale("log")
        _no_minor_labels(ax.xaxis)
    ax.set(xlabel=x_label, ylabel=y_label, title=title)
    ax.grid(alpha=0.3, which="both")
    if len(series) > 1 or any(series):
        ax.legend(fontsize=8)
    return _save(fig, path)
