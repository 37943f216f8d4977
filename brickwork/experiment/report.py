"""Run reports: the results table, ``report.md`` and its plots."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from brickwork.analysis.plots import plot_accuracy_vs, plot_accuracy_vs_flops, plot_curves, plot_metric_against
from brickwork.data.base import Dataset
from brickwork.experiment.config import RunConfig
from brickwork.experiment.context import StageContext
from brickwork.experiment.store import RunRecord, SweepRecord
from brickwork.kernels.autotune import describe_choices
from brickwork.persist import atomic_write_text

# Columns of the results table: metric key, header, format.
COLUMNS: list[tuple[str, str, str]] = [
    ("test_accuracy", "test acc", "{:.4f}"),
    ("test_loss", "test loss", "{:.4f}"),
    ("test_bits_per_char", "bits/char", "{:.3f}"),
    ("params", "params", "{:,.0f}"),
    ("flops_per_sample", "FLOPs/sample", "{:,.0f}"),
    ("latency_us_per_sample", "latency µs/sample", "{:.1f}"),
    ("train_seconds", "train s", "{:.1f}"),
    # the ``lmc`` stage (mean ± std over seed pairs in a repeated-seed run): naive, weight-, activation-matched
    ("lmc_none_loss_barrier", "loss barrier naive", "{:.4f}"),
    ("lmc_weight_loss_barrier", "loss barrier weight-matched", "{:.4f}"),
    ("lmc_activation_loss_barrier", "loss barrier act.-matched", "{:.4f}"),
    ("lmc_none_midpoint_accuracy", "midpoint acc naive", "{:.4f}"),
    ("lmc_weight_midpoint_accuracy", "midpoint acc weight-matched", "{:.4f}"),
    ("lmc_activation_midpoint_accuracy", "midpoint acc act.-matched", "{:.4f}"),
]


#: A table column: the row key, the header, and a ``str.format`` pattern for the value.
Column = tuple[str, str, str]


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """A Markdown table: one row per mapping, ``columns`` as (key, header, format).

    A missing or ``None`` value leaves its cell empty. Where a row also has ``<key>_std`` (a mean
    over several seeds), the cell reads ``mean ± std``. Every report table goes through here.
    """
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r, k, fmt) for k, _, fmt in columns) + " |")
    return "\n".join(lines)


#: Columns of a table of trade-off points (:func:`brickwork.analysis.tradeoff.measure_point`).
POINT_COLUMNS: list[Column] = [
    ("label", "model", "{}"),
    ("accuracy", "accuracy", "{:.4f}"),
    ("flops", "FLOPs/sample", "{:,.0f}"),
    ("latency_us", "latency µs/sample", "{:.2f}"),
    ("params", "params", "{:,}"),
]


def tradeoff_section(ctx: StageContext, points: Sequence[Mapping[str, Any]], name: str, title: str) -> list[str]:
    """Save accuracy-vs-FLOPs and (where every point has a latency) accuracy-vs-latency plots of
    ``points`` under ``<run>/plots``; the Markdown image lines of a stage's report section."""
    stem = stage_plot_stem(ctx, name)
    plots = ctx.run_dir / "plots"
    plot_accuracy_vs_flops(points, plots / f"{stem}-flops.png", title=f"{title}: accuracy against FLOPs")
    lines = [f"![{title}: accuracy vs FLOPs](plots/{stem}-flops.png)"]
    if all("latency_us" in p for p in points):
        plot_accuracy_vs(
            points,
            plots / f"{stem}-latency.png",
            x_key="latency_us",
            x_label="measured latency per sample (µs, batched)",
            title=f"{title}: accuracy against latency",
        )
        lines.append(f"![{title}: accuracy vs latency](plots/{stem}-latency.png)")
    return lines


def stage_plot_stem(ctx: StageContext, name: str) -> str:
    """File stem of a stage's plots: ``<name>-<variant>``, and ``-seed-<s>`` in a repeated-seed run."""
    return f"{name}-{ctx.label}" + ("" if ctx.dir.parent == ctx.run_dir else f"-{ctx.dir.name}")


def results_table(summary: Mapping[str, Mapping[str, Any]], *, first: str = "model") -> str:
    """A Markdown table, one row per model (or run), the metrics of :data:`COLUMNS` that exist.

    Where a metric has a ``<key>_std`` (runs over several seeds) the cell reads ``mean ± std``.
    """
    cols = [c for c in COLUMNS if any(c[0] in m for m in summary.values())]
    seeds = any("seeds" in m for m in summary.values())
    rows = [{"_label": label, "_seeds": metrics.get("seeds", 1), **metrics} for label, metrics in summary.items()]
    lead: list[Column] = [("_label", first, "{}")] + ([("_seeds", "seeds", "{}")] if seeds else [])
    return markdown_table(rows, lead + cols)


def _cell(row: Mapping[str, Any], key: str, fmt: str) -> str:
    if row.get(key) is None:
        return ""
    std = row.get(f"{key}_std")
    return fmt.format(row[key]) + (f" ± {fmt.format(std)}" if std else "")


def write_report(
    run_dir: Path, cfg: RunConfig, data: Dataset, results: Mapping[str, Mapping[str, Any]], *, run_id: str
) -> Path:
    """Write ``report.md`` with the metrics table and PNG plots into ``run_dir``."""
    summary = {label: r["metrics"] for label, r in results.items()}
    points = [p for r in results.values() for p in r["points"]]
    sections = [
        f"# {cfg.name} — run {run_id}",
        f"{time.strftime('%Y-%m-%d %H:%M')}. Data: {data.summary()}; source: {data.source or data.name}. "
        f"Seed {cfg.seed}, device {cfg.device}.",
        "## Results",
        results_table(summary),
        "FLOPs are executed per sample in the forward pass (matmuls, convolutions and attention, "
        "1 multiply-accumulate = 2 FLOPs), counted on the evaluation data.",
    ]
    backends = describe_choices(("moe", "sparse"))
    if backends != "none":  # which kernel each MoE / group-sparse layer class ran (kernels/autotune.py)
        sections.append(f"Backends per layer class (measured, cached or pinned on this machine): {backends}.")
    histories = {label: r["history"] for label, r in results.items() if r["history"]}
    if histories:
        plot_curves(histories, run_dir / "plots" / "curves.png")
        sections += ["## Training curves", "![training curves](plots/curves.png)"]
    if len(points) > 1:
        plot_accuracy_vs_flops(points, run_dir / "plots" / "accuracy_vs_flops.png", title=cfg.name)
        sections += ["## Accuracy against compute", "![accuracy vs FLOPs](plots/accuracy_vs_flops.png)"]
    for label, r in results.items():
        if r.get("report"):
            sections += [f"## {label}", *r["report"]]
    sections += ["## Config", "```yaml", (run_dir / "config.yaml").read_text().rstrip(), "```"]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n\n".join(sections) + "\n")
    return path


def compare_dir_name(run_ids: Sequence[str]) -> str:
    """Default folder of a comparison report: ``compare-<id>-<id>...``, or for many runs (whose
    joined ids would pass the file system's 255-byte limit) ``compare-<first>-and-<n-1>-more-<hash>``."""
    name = "compare-" + "-".join(run_ids)
    if len(name) <= 120:
        return name
    digest = hashlib.sha256("\n".join(run_ids).encode()).hexdigest()[:10]
    return f"compare-{run_ids[0]}-and-{len(run_ids) - 1}-more-{digest}"


def compare_runs(records: Sequence[Any], out_dir: Path) -> Path:
    """A report comparing several runs: one table row and one plot point per (run, model)."""
    summary: dict[str, dict[str, Any]] = {}
    points = []
    for rec in records:
        for label, metrics in rec.metrics.items():
            key = f"{rec.id}/{label}"
            summary[key] = metrics
            if "flops_per_sample" in metrics and any(k.endswith("_accuracy") for k in metrics):
                acc = metrics.get("test_accuracy", metrics.get("val_accuracy"))
                points.append({"label": f"{rec.name}/{label}", "accuracy": acc, "flops": metrics["flops_per_sample"]})
    sections = ["# Run comparison", results_table(summary, first="run/model")]
    if len(points) > 1:
        plot_accuracy_vs_flops(points, out_dir / "accuracy_vs_flops.png", title="Runs compared")
        sections.append("![accuracy vs FLOPs](accuracy_vs_flops.png)")
    path = out_dir / "report.md"
    atomic_write_text(path, "\n\n".join(sections) + "\n")
    return path


# --- Sweeps: one row per point, its swept values beside its final metrics ------------------------


def sweep_rows(sweep: SweepRecord, runs: Mapping[int, RunRecord]) -> list[dict[str, Any]]:
    """One row per (point, model variant): ``point``, ``status``, ``run``, ``model``, the point's
    values under their key paths, and the run's final metrics; a point never started has only
    its values (status ``not started``)."""
    rows = []
    for i, p in enumerate(sweep.points):
        rec = runs.get(i)
        base = {"_point": i + 1, "_status": "not started" if rec is None else rec.status, **p["values"]}
        base["_run"] = None if rec is None else rec.id
        variants: list[tuple[str | None, Mapping[str, Any]]] = [(None, {})]
        if rec is not None and rec.metrics:
            variants = list(rec.metrics.items())
        for label, metrics in variants:
            rows.append({**base, "_model": label, **metrics})
    return rows


def sweep_table(sweep: SweepRecord, runs: Mapping[int, RunRecord]) -> str:
    """The sweep's comparison table (Markdown): swept values, status, run, metrics of :data:`COLUMNS`."""
    rows = sweep_rows(sweep, runs)
    axes: list[Column] = [(key, key, "{}") for key, _ in sweep.axes]
    several = len({r["_model"] for r in rows if r["_model"] is not None}) > 1
    lead: list[Column] = [("_point", "point", "{}"), *axes] + ([("_model", "model", "{}")] if several else [])
    cols = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    return markdown_table(rows, [*lead, *cols, ("_status", "status", "{}"), ("_run", "run", "{}")])


def sweep_report(sweep: SweepRecord, runs: Mapping[int, RunRecord], out_dir: Path) -> tuple[Path, str]:
    """Write ``report.md`` of a sweep into ``out_dir`` (its folder): the table, test accuracy
    against FLOPs, and test accuracy against each numeric axis (one line per setting of the
    other axes). Returns the report's path and the table."""
    table = sweep_table(sweep, runs)
    rows = [r for r in sweep_rows(sweep, runs) if r["_status"] == "completed"]
    scored = [r for r in rows if isinstance(r.get("test_accuracy"), (int, float))]
    several = len({r["_model"] for r in rows}) > 1
    sections = [
        f"# {sweep.name} — sweep {sweep.id}",
        f"{len(sweep.points)} points over {', '.join(f'{k} ({len(v)} values)' for k, v in sweep.axes)}; "
        f"{len(rows)} completed run(s).",
        "## Points",
        table,
    ]
    points = [
        {
            "label": f"p{r['_point']}" + (f"/{r['_model']}" if several else ""),
            "accuracy": r["test_accuracy"],
            "flops": r["flops_per_sample"],
        }
        for r in scored
        if isinstance(r.get("flops_per_sample"), (int, float))
    ]
    if points:
        plot_accuracy_vs_flops(points, out_dir / "accuracy_vs_flops.png", title=f"{sweep.name}: sweep {sweep.id}")
        sections += ["## Test accuracy against compute", "![accuracy vs FLOPs](accuracy_vs_flops.png)"]
    for key, values in sweep.axes:
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) or not scored:
            continue  # a name or a list is not an axis to plot along
        series: dict[str, list[tuple[float, float]]] = {}
        for r in scored:
            rest = [f"{k}={r[k]}" for k, _ in sweep.axes if k != key] + ([str(r["_model"])] if several else [])
            series.setdefault(", ".join(rest), []).append((float(r[key]), float(r["test_accuracy"])))
        name = "accuracy_vs_" + "".join(c if c.isalnum() or c in "._-" else "_" for c in key) + ".png"
        plot_metric_against(
            series, out_dir / name, x_label=key, y_label="test accuracy", title=f"{sweep.name}: sweep {sweep.id}"
        )
        sections += [f"## Test accuracy against {key}", f"![accuracy vs {key}]({name})"]
    path = out_dir / "report.md"
    atomic_write_text(path, "\n\n".join(sections) + "\n")
    return path, table
