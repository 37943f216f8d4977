"""The early-exit stage: accuracy and calibration per exit, and the accuracy-compute curve of
each exit policy, with the operating threshold chosen on validation data and measured on test."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import Field
from torch import Tensor, nn

from brickwork.analysis.calibration import expected_calibration_error
from brickwork.analysis.compute import FlopMeter
from brickwork.analysis.latency import measure_latency
from brickwork.analysis.pareto import pareto_front
from brickwork.data.base import Split
from brickwork.experiment.context import StageContext
from brickwork.experiment.report import markdown_table as table
from brickwork.experiment.stages.depth import SplitName, accuracy_and_flops
from brickwork.nn.exits import EarlyExit, ExitPolicy
from brickwork.persist import write_json
from brickwork.registry import register

THRESHOLDS = [1.0, 0.999, 0.995, 0.99, 0.98, 0.97, 0.96, 0.95, 0.93, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5, 0.4,
              0.3, 0.2, 0.1, 0.0]


class ExitAt(nn.Module):
    """The exit model cut after body layer ``layer``, answering from that exit for every sample."""

    def __init__(self, model: EarlyExit, layer: int) -> None:
        super().__init__()
        self.model, self.layer = model, layer

    def forward(self, x: Tensor) -> Tensor:
        m = self.model
        h = m.body.taps(m.stem(x), [self.layer])[0]
        return m.head(h) if self.layer == len(m.body) - 1 else m.exits[str(self.layer)](h)


@torch.no_grad()
def exit_outputs(model: EarlyExit, split: Split, batch_size: int, device: str) -> list[Tensor]:
    """Outputs of every exit and the final head on every sample of ``split`` (on the CPU)."""
    was = model.training
    model.eval()
    try:
        outs = [[z.cpu() for z in model.all_exits(split.x[s : s + batch_size].to(device))]
                for s in range(0, len(split), batch_size)]
    finally:
        model.train(was)
    return [torch.cat([o[k] for o in outs]) for k in range(len(outs[0]))]


@torch.no_grad()
def piece_flops(model: EarlyExit, x: Tensor) -> dict[str, float]:
    """FLOPs per sample of each piece, counted by the dispatcher: ``stem``, ``layer<i>``,
    ``exit<i>`` (head), ``gate<i>`` and ``head``."""
    was = model.training
    model.eval()
    out: dict[str, float] = {}

    def count(name: str, fn: Any, *args: Any) -> Any:
        meter = FlopMeter(depth=1)
        with meter:
            result = fn(*args)
        out[name] = meter.total / len(x)
        return result

    try:
        h = count("stem", model.stem, x)
        for i, layer in enumerate(model.body.layers):
            h = count(f"layer{i}", layer, h)
            if str(i) in model.exits:
                z = count(f"exit{i}", model.exits[str(i)], h)
                if model.gates is not None:
                    count(f"gate{i}", model.gates[str(i)], z)
        count("head", model.head, h)
    finally:
        model.train(was)
    return out


def path_costs(model: EarlyExit, pieces: dict[str, float], policy: str) -> list[float]:
    """FLOPs per sample of leaving at each exit and at the end, scoring every exit on the way."""
    costs, running = [], pieces["stem"]
    for i in range(len(model.body)):
        running += pieces[f"layer{i}"]
        if str(i) in model.exits:
            running += pieces[f"exit{i}"] + (pieces[f"gate{i}"] if policy == "gate" else 0.0)
            costs.append(running)
    return [*costs, running + pieces["head"]]


@torch.no_grad()
def simulate(model: EarlyExit, outs: list[Tensor], y: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """Where each sample leaves (index into ``outs``) and whether each is right, as the
    compacting forward decides (tested equal), from every exit's precomputed outputs."""
    n = outs[-1].shape[0]
    where = torch.full((n,), len(outs) - 1, dtype=torch.long)
    if threshold < 1.0:
        taken = torch.zeros(n, dtype=torch.bool)
        for k, layer in enumerate(model.exit_layers):
            leave = (model.score(layer, outs[k]).cpu() > threshold) & ~taken
            where[leave] = k
            taken |= leave
    pred = torch.stack([z.argmax(-1) for z in outs])  # (exits + 1, N, ...)
    chosen = pred.gather(0, where.view(1, -1, *[1] * (pred.dim() - 2)).expand(1, *pred.shape[1:]))[0]
    return where, (chosen == y).float()


def select(sweep: list[dict[str, Any]], max_drop: float, target_saving: float | None) -> dict[str, Any]:
    """The operating point of a threshold sweep, chosen on validation numbers.

    With a FLOPs budget (``target_saving``): the most accurate threshold saving at least that
    share, as budgeted early-exit inference chooses (Huang et al., 2018, MSDNet); without one, or
    if no threshold saves that much: the fewest FLOPs within ``max_drop`` of the full model.
    ``sweep[0]`` is the full model (threshold 1.0).
    """
    full = sweep[0]
    if target_saving is not None:
        within = [p for p in sweep if p["val_flops"] <= (1 - target_saving) * full["val_flops"]]
        if within:
            return max(within, key=lambda p: (p["val_accuracy"], -p["val_flops"]))
    ok = [p for p in sweep if p["val_accuracy"] >= full["val_accuracy"] - max_drop]
    return min(ok, key=lambda p: (p["val_flops"], -p["val_accuracy"]))


def truncated_cost(model: EarlyExit, pieces: dict[str, float], layer: int) -> float:
    """FLOPs per sample of the model cut at ``layer`` and answering from its exit (:class:`ExitAt`)."""
    body = pieces["stem"] + sum(pieces[f"layer{i}"] for i in range(layer + 1))
    return body + (pieces["head"] if layer == len(model.body) - 1 else pieces[f"exit{layer}"])


@torch.no_grad()
def exit_shares(model: EarlyExit, split: Split, batch_size: int, device: str) -> dict[int, float]:
    """Share of samples leaving at each layer, in eval mode at the current threshold."""
    was = model.training
    model.eval()
    layers = []
    try:
        for s in range(0, len(split), batch_size):
            model(split.x[s : s + batch_size].to(device))
            assert model.record is not None
            layers.append(model.record.layer.cpu())
    finally:
        model.train(was)
    every = torch.cat(layers)
    return {int(v): float((every == v).float().mean()) for v in every.unique()}


def per_exit(outs: list[Tensor], y: Tensor, layers: list[int], bins: int) -> list[dict[str, Any]]:
    """Accuracy and expected calibration error of every exit (and the final head) on all samples."""
    return [{"layer": layer, "exit": "final" if k == len(outs) - 1 else f"exit {layer}",
             "accuracy": float((z.argmax(-1) == y).float().mean()), "ece": expected_calibration_error(z, y, bins)}
            for k, (z, layer) in enumerate(zip(outs, layers, strict=True))]


def plot_curves(curves: Mapping[str, Sequence[Mapping[str, Any]]], marks: Sequence[Mapping[str, Any]], path: Path,
                *, x_key: str, x_label: str, title: str) -> Path:
    """One accuracy-against-cost curve per policy, fixed exits as marks, Pareto front of all dashed."""
    import matplotlib.pyplot as plt  # after brickwork.analysis.plots chose the Agg backend

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    every = [p for ps in curves.values() for p in ps] + list(marks)
    for name, ps in curves.items():
        ps = sorted(ps, key=lambda p: p[x_key])
        ax.plot([p[x_key] for p in ps], [p["accuracy"] for p in ps], marker=".", label=f"{name} threshold sweep")
        star = [p for p in ps if p.get("chosen")]
        ax.scatter([p[x_key] for p in star], [p["accuracy"] for p in star], marker="*", s=160, zorder=4)
    ax.scatter([p[x_key] for p in marks], [p["accuracy"] for p in marks], marker="s", color="k", s=25, zorder=3,
               label="every sample at one exit")
    for p in marks:
        ax.annotate(p["label"], (p[x_key], p["accuracy"]), textcoords="offset points", xytext=(4, -10), fontsize=7)
    xs, ys = [p[x_key] for p in every], [p["accuracy"] for p in every]
    front = pareto_front(xs, ys)
    ax.plot([xs[i] for i in front], [ys[i] for i in front], "--", color="tab:red", lw=1, label="Pareto front")
    ax.set_xscale("log")
    ax.set(xlabel=x_label, ylabel="accuracy", title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@register("stage", "exits")
def exits(
    ctx: StageContext,
    /,
    max_drop: Annotated[float, Field(ge=0, lt=1)] = 0.005,
    thresholds: list[Annotated[float, Field(ge=0, le=1)]] | None = None,
    policies: list[ExitPolicy] | None = None,
    split: SplitName = "test",
    batch_size: Annotated[int, Field(ge=1)] = 256,
    latency_repeats: Annotated[int, Field(ge=1)] = 3,
    ece_bins: Annotated[int, Field(ge=1)] = 15,
    target_saving: Annotated[float, Field(ge=0, le=1)] | None = None,
) -> None:
    """Per-exit accuracy and ECE, each policy's accuracy against FLOPs and latency, an operating point.

    The sweep decides every sample's exit from the exits' outputs computed once (exactly what the
    compacting forward decides) and prices each path with per-module FLOPs counted by the
    dispatcher; latency is measured at every threshold. The threshold of the model's own policy
    is chosen on the validation split (:func:`select`: fewest FLOPs within ``max_drop`` of the
    full-depth accuracy, or with ``target_saving`` the most accurate one saving that share of
    FLOPs), set on the model (saved with it), and measured on ``split`` by the real compacting
    forward. With ``target_saving`` the report says whether the point saves at least that share
    within ``max_drop`` on ``split``.
    """
    model = ctx.model
    if not isinstance(model, EarlyExit):
        raise TypeError(f"the exits stage needs an early_exit model, not {type(model).__name__}")
    val, test = ctx.data.val, getattr(ctx.data, split)
    xb = test.x[:batch_size].to(ctx.device)
    own, saved = model.policy, float(model.threshold)
    policies = policies or [own, *[p for p in ("confidence", "entropy", "gate") if p != own]]
    policies = [p for p in policies if p != "gate" or model.gates is not None]
    grid = sorted(set(thresholds or THRESHOLDS) | {1.0}, reverse=True)
    layers = [*model.exit_layers, len(model.body) - 1]
    outs = {"val": exit_outputs(model, val, batch_size, ctx.device),
            "test": exit_outputs(model, test, batch_size, ctx.device)}
    pieces = piece_flops(model, xb)
    plain = pieces["stem"] + sum(pieces[f"layer{i}"] for i in range(len(model.body))) + pieces["head"]

    rows = per_exit(outs["test"], test.y, layers, ece_bins)
    marks = []
    for r in rows:
        cost = truncated_cost(model, pieces, r["layer"])
        r.update(flops=cost, latency_us=measure_latency(ExitAt(model, r["layer"]), xb, repeats=latency_repeats) * 1e6)
        marks.append({"label": r["exit"], "accuracy": r["accuracy"], "flops": cost, "latency_us": r["latency_us"]})

    curves: dict[str, list[dict[str, Any]]] = {}
    chosen: dict[str, dict[str, Any]] = {}
    try:
        for policy in policies:
            model.policy = policy
            costs = torch.tensor(path_costs(model, pieces, policy), dtype=torch.float64)
            sweep = []
            for t in grid:
                model.threshold.fill_(t)
                point: dict[str, Any] = {"label": f"{policy} {t:g}", "threshold": t}
                for key, data in (("val_", val), ("", test)):
                    where, hit = simulate(model, outs["val" if key else "test"], data.y, t)
                    point[f"{key}accuracy"] = float(hit.mean())
                    point[f"{key}flops"] = float(costs[where].mean()) if t < 1.0 else plain
                point["latency_us"] = measure_latency(model, xb, repeats=latency_repeats) * 1e6
                sweep.append(point)
            full = sweep[0]  # threshold 1.0: nobody exits
            best = select(sweep, max_drop, target_saving)
            best["chosen"] = True
            chosen[policy] = {**best, "policy": policy, "flops_saving": 1 - best["flops"] / plain,
                              "latency_saving": 1 - best["latency_us"] / full["latency_us"],
                              "accuracy_drop": full["accuracy"] - best["accuracy"], "full_accuracy": full["accuracy"]}
            curves[policy] = sweep
    finally:
        model.policy = own
        model.threshold.fill_(saved)
    op = chosen[own]
    model.threshold.fill_(op["threshold"])  # the operating point, saved with the weights
    # The operating point for real: the compacting forward, FLOPs counted by the dispatcher.
    measured_acc, measured_flops = accuracy_and_flops(model, test, batch_size, ctx.device)
    shares = exit_shares(model, test, batch_size, ctx.device)
    for r in rows:
        r["share"] = shares.get(r["layer"], 0.0)
    sweep_flops, sweep_acc = op["flops"], op["accuracy"]
    op.update(accuracy=measured_acc, flops=measured_flops, flops_saving=1 - measured_flops / plain,
              accuracy_drop=op["full_accuracy"] - measured_acc)

    ctx.metrics.update(exit_threshold=op["threshold"], exit_accuracy=op["accuracy"],
                       exit_full_accuracy=op["full_accuracy"], exit_accuracy_drop=op["accuracy_drop"],
                       exit_flops_saving=op["flops_saving"], exit_latency_saving=op["latency_saving"],
                       # the sweep's prices against the dispatcher's count of the real forward (0 when they agree)
                       exit_sweep_flops_error=abs(sweep_flops - measured_flops) / measured_flops,
                       exit_sweep_accuracy_error=abs(sweep_acc - measured_acc))
    ctx.points.extend([*({**m, "label": f"{ctx.label} {m['label']}"} for m in marks[:-1]),
                       {"label": f"{ctx.label} {own}>{op['threshold']:g}", "accuracy": op["accuracy"],
                        "flops": op["flops"], "latency_us": op["latency_us"]}])
    stem = f"exits-{ctx.label}" + ("" if ctx.dir.parent == ctx.run_dir else f"-{ctx.dir.name}")
    plots = ctx.run_dir / "plots"
    plot_curves(curves, marks, plots / f"{stem}-flops.png", x_key="flops", x_label="FLOPs executed per sample",
                title="Early exits: accuracy against FLOPs")
    plot_curves(curves, marks, plots / f"{stem}-latency.png", x_key="latency_us",
                x_label=f"measured latency per sample (µs, batch {len(xb)})",
                title="Early exits: accuracy against latency")
    write_json(ctx.stage_path("exits-sweep.json"), {"pieces": pieces, "per_exit": rows, "sweeps": curves})
    budgeted = target_saving is not None and op["val_flops"] <= (1 - target_saving) * curves[own][0]["val_flops"]
    rule = (f"the most accurate on validation with at least {target_saving:.0%} fewer FLOPs" if budgeted
            else f"fewest FLOPs within {max_drop} of the full-depth accuracy on validation")
    verdict = "" if target_saving is None else (
        f" Target ({target_saving:.0%} fewer FLOPs within {100 * max_drop:g} points on {split}): "
        + ("**met**." if op["flops_saving"] >= target_saving and op["accuracy_drop"] <= max_drop else "**not met**."))
    ctx.report.extend([
        f"### Early exits ({split})",
        f"Policy **{own}**, threshold {op['threshold']:g} (chosen as {rule}), measured by the compacting "
        f"forward: accuracy {op['accuracy']:.4f} against "
        f"{op['full_accuracy']:.4f} at full depth (drop {100 * op['accuracy_drop']:.2f} points), "
        f"**{op['flops_saving']:.1%} fewer FLOPs** ({op['flops']:,.0f} against {plain:,.0f} per sample, counted by "
        f"the dispatcher), {op['latency_saving']:.1%} lower latency (batch {len(xb)}).{verdict}",
        "Each exit on every sample (ECE: expected calibration error, "
        f"{ece_bins} bins; share: samples leaving there at the operating point):",
        table(rows, [("exit", "exit", "{}"), ("accuracy", "accuracy", "{:.4f}"), ("ece", "ECE", "{:.4f}"),
                     ("flops", "FLOPs/sample", "{:,.0f}"), ("latency_us", "µs/sample", "{:.2f}"),
                     ("share", "share", "{:.1%}")]),
        "Operating point of each policy (chosen on validation, measured on the test sweep; the model's own policy "
        "re-measured by the compacting forward):",
        table(list(chosen.values()), [("policy", "policy", "{}"), ("threshold", "threshold", "{:g}"),
                                      ("val_accuracy", "val acc", "{:.4f}"), ("accuracy", "test acc", "{:.4f}"),
                                      ("accuracy_drop", "drop", "{:.4f}"), ("flops_saving", "FLOPs saved", "{:.1%}"),
                                      ("latency_saving", "latency saved", "{:.1%}")]),
        f"![exits vs FLOPs](plots/{stem}-flops.png)", f"![exits vs latency](plots/{stem}-latency.png)",
    ])
