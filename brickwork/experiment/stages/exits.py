"""The early-exit stage: accuracy and calibration per exit, and the accuracy-compute curve of
each exit policy, with the operating threshold chosen on validation data and measured on test.

The measuring, the simulation of the exit rule and the selection live in
:mod:`brickwork.analysis.exits`; this stage calls them, records and reports.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from pydantic import Field

from brickwork.analysis.calibration import conformal_at_exits
from brickwork.analysis.compute import accuracy_and_flops, stack_flops
from brickwork.analysis.exits import exit_outputs, exit_scores, exit_shares, path_costs, per_exit, select, simulate
from brickwork.analysis.plots import plot_exit_curves
from brickwork.analysis.timing import measure_latency
from brickwork.data.batching import batches
from brickwork.experiment.context import SplitName, StageContext
from brickwork.experiment.report import markdown_table as table
from brickwork.experiment.report import stage_plot_stem
from brickwork.nn.exits import EarlyExit, ExitAt, ExitPolicy, can_exit
from brickwork.persist import write_json
from brickwork.registry import register

THRESHOLDS = [
    1.0,
    0.999,
    0.995,
    0.99,
    0.98,
    0.97,
    0.96,
    0.95,
    0.93,
    0.9,
    0.85,
    0.8,
    0.75,
    0.7,
    0.6,
    0.5,
    0.4,
    0.3,
    0.2,
    0.1,
    0.0,
]


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
    conformal_alpha: Annotated[float, Field(gt=0, lt=1)] | None = 0.1,
) -> None:
    """Per-exit accuracy and ECE, each policy's accuracy against FLOPs and latency, an operating point.

    The sweep decides every sample's exit from the exits' outputs computed once (exactly what the
    compacting forward decides) and prices each path with per-module FLOPs counted by the
    dispatcher; latency is measured at every threshold. The threshold of the model's own policy
    is chosen on the validation split (:func:`select`: fewest FLOPs within ``max_drop`` of the
    full-depth accuracy, or with ``target_saving`` the most accurate one saving that share of
    FLOPs), set on the model (saved with it), and measured on ``split`` by the real compacting
    forward. With ``target_saving`` the report says whether the point saves at least that share
    within ``max_drop`` on ``split``. With ``conformal_alpha`` (classification), split-conformal
    prediction sets at each sample's exit (JEI-DNN's intervals; ``analysis.calibration``) are
    calibrated per exit on the validation split at the operating point and their coverage and
    mean size measured on ``split``.
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
    outs = {
        "val": exit_outputs(model, val, batch_size, ctx.device),
        "test": exit_outputs(model, test, batch_size, ctx.device),
    }
    pieces = stack_flops(model, xb)
    plain = pieces.full

    rows = per_exit(outs["test"], test.y, layers, ece_bins)
    marks = []
    for r in rows:
        cost = pieces.truncated(r["layer"])
        r.update(flops=cost, latency_us=measure_latency(ExitAt(model, r["layer"]), xb, repeats=latency_repeats) * 1e6)
        marks.append({"label": r["exit"], "accuracy": r["accuracy"], "flops": cost, "latency_us": r["latency_us"]})

    curves: dict[str, list[dict[str, Any]]] = {}
    chosen: dict[str, dict[str, Any]] = {}
    try:
        for policy in policies:
            model.policy = policy
            costs = torch.tensor(path_costs(model, pieces, policy), dtype=torch.float64)
            scores = {split_: exit_scores(model, o) for split_, o in outs.items()}  # the policy's, once
            sweep = []
            for t in grid:
                model.threshold.fill_(t)
                point: dict[str, Any] = {"label": f"{policy} {t:g}", "threshold": t}
                for key, data in (("val_", val), ("", test)):
                    name = "val" if key else "test"
                    where, hit = simulate(scores[name], outs[name], data.y, t)
                    point[f"{key}accuracy"] = float(hit.mean())
                    point[f"{key}flops"] = float(costs[where].mean()) if can_exit(t) else plain
                point["latency_us"] = measure_latency(model, xb, repeats=latency_repeats) * 1e6
                sweep.append(point)
            full = sweep[0]  # threshold 1.0: nobody exits
            best = select(sweep, max_drop, target_saving)
            best["chosen"] = True
            chosen[policy] = {
                **best,
                "policy": policy,
                "flops_saving": 1 - best["flops"] / plain,
                "latency_saving": 1 - best["latency_us"] / full["latency_us"],
                "accuracy_drop": full["accuracy"] - best["accuracy"],
                "full_accuracy": full["accuracy"],
            }
            curves[policy] = sweep
    finally:
        model.policy = own
        model.threshold.fill_(saved)
    op = chosen[own]
    model.threshold.fill_(op["threshold"])  # the operating point, saved with the weights
    # The operating point for real: the compacting forward, FLOPs counted by the dispatcher.
    measured_acc, measured_flops = accuracy_and_flops(model, batches(test.x, test.y, batch_size, device=ctx.device))
    shares = exit_shares(model, test, batch_size, ctx.device)
    for r in rows:
        r["share"] = shares.get(r["layer"], 0.0)
    sweep_flops, sweep_acc = op["flops"], op["accuracy"]
    op.update(
        accuracy=measured_acc,
        flops=measured_flops,
        flops_saving=1 - measured_flops / plain,
        accuracy_drop=op["full_accuracy"] - measured_acc,
    )

    conformal: list[str] = []
    if conformal_alpha is not None and test.y.dim() == 1:
        at = {name: simulate(exit_scores(model, o), o, data.y, op["threshold"])[0] for name, o, data in
              (("val", outs["val"], val), ("test", outs["test"], test))}  # fmt: skip
        conf, cover = conformal_at_exits(
            outs["val"], val.y, at["val"], outs["test"], test.y, at["test"], conformal_alpha
        )
        ctx.metrics.update(exit_conformal_coverage=cover["coverage"], exit_conformal_set_size=cover["set_size"])
        names = [r["exit"] for r in rows]
        conformal = [
            f"Conformal prediction sets at each sample's exit (split-conformal, LAC score 1 - p_y, calibrated per "
            f"exit on {len(val)} validation samples at this operating point, alpha {conformal_alpha}): coverage "
            f"**{cover['coverage']:.4f}** (target >= {1 - conformal_alpha:.2f}), mean set size "
            f"**{cover['set_size']:.3f}** classes on {split}.",
            table(
                [
                    {"exit": n, "cal": int(c), "q": float(q), "coverage": cv, "size": sz}
                    for n, c, q, cv, sz in zip(
                        names,
                        conf.calibrated,
                        conf.qhat,
                        cover["coverage_per_exit"],
                        cover["set_size_per_exit"],
                        strict=True,
                    )  # fmt: skip
                ],
                [
                    ("exit", "exit", "{}"),
                    ("cal", "calibration samples", "{}"),
                    ("q", "score quantile", "{:.4f}"),
                    ("coverage", "coverage", "{:.4f}"),
                    ("size", "mean set size", "{:.3f}"),
                ],
            ),
        ]
    ctx.metrics.update(
        exit_threshold=op["threshold"],
        exit_accuracy=op["accuracy"],
        exit_full_accuracy=op["full_accuracy"],
        exit_accuracy_drop=op["accuracy_drop"],
        exit_flops_saving=op["flops_saving"],
        exit_latency_saving=op["latency_saving"],
        # the sweep's prices against the dispatcher's count of the real forward (0 when they agree)
        exit_sweep_flops_error=abs(sweep_flops - measured_flops) / measured_flops,
        exit_sweep_accuracy_error=abs(sweep_acc - measured_acc),
    )
    ctx.points.extend(
        [
            *({**m, "label": f"{ctx.label} {m['label']}"} for m in marks[:-1]),
            {
                "label": f"{ctx.label} {own}>{op['threshold']:g}",
                "accuracy": op["accuracy"],
                "flops": op["flops"],
                "latency_us": op["latency_us"],
            },
        ]
    )
    stem = stage_plot_stem(ctx, "exits")
    plots = ctx.run_dir / "plots"
    plot_exit_curves(
        curves,
        marks,
        plots / f"{stem}-flops.png",
        x_key="flops",
        x_label="FLOPs executed per sample",
        title="Early exits: accuracy against FLOPs",
    )
    plot_exit_curves(
        curves,
        marks,
        plots / f"{stem}-latency.png",
        x_key="latency_us",
        x_label=f"measured latency per sample (µs, batch {len(xb)})",
        title="Early exits: accuracy against latency",
    )
    write_json(ctx.stage_path("exits-sweep.json"), {"pieces": pieces.as_dict(), "per_exit": rows, "sweeps": curves})
    budgeted = target_saving is not None and op["val_flops"] <= (1 - target_saving) * curves[own][0]["val_flops"]
    rule = (
        f"the most accurate on validation with at least {target_saving:.0%} fewer FLOPs"
        if budgeted
        else f"fewest FLOPs within {max_drop} of the full-depth accuracy on validation"
    )
    verdict = (
        ""
        if target_saving is None
        else (
            f" Target ({target_saving:.0%} fewer FLOPs within {100 * max_drop:g} points on {split}): "
            + (
                "**met**."
                if op["flops_saving"] >= target_saving and op["accuracy_drop"] <= max_drop
                else "**not met**."
            )
        )
    )
    ctx.report.extend(
        [
            f"### Early exits ({split})",
            f"Policy **{own}**, threshold {op['threshold']:g} (chosen as {rule}), measured by the compacting "
            f"forward: accuracy {op['accuracy']:.4f} against "
            f"{op['full_accuracy']:.4f} at full depth (drop {100 * op['accuracy_drop']:.2f} points), "
            f"**{op['flops_saving']:.1%} fewer FLOPs** ({op['flops']:,.0f} against {plain:,.0f} per sample, counted by "
            f"the dispatcher), {op['latency_saving']:.1%} lower latency (batch {len(xb)}).{verdict}",
            "Each exit on every sample (ECE: expected calibration error, "
            f"{ece_bins} bins; share: samples leaving there at the operating point):",
            table(
                rows,
                [
                    ("exit", "exit", "{}"),
                    ("accuracy", "accuracy", "{:.4f}"),
                    ("ece", "ECE", "{:.4f}"),
                    ("flops", "FLOPs/sample", "{:,.0f}"),
                    ("latency_us", "µs/sample", "{:.2f}"),
                    ("share", "share", "{:.1%}"),
                ],
            ),
            "Operating point of each policy (chosen on validation, measured on the test sweep; the model's own policy "
            "re-measured by the compacting forward):",
            table(
                list(chosen.values()),
                [
                    ("policy", "policy", "{}"),
                    ("threshold", "threshold", "{:g}"),
                    ("val_accuracy", "val acc", "{:.4f}"),
                    ("accuracy", "test acc", "{:.4f}"),
                    ("accuracy_drop", "drop", "{:.4f}"),
                    ("flops_saving", "FLOPs saved", "{:.1%}"),
                    ("latency_saving", "latency saved", "{:.1%}"),
                ],
            ),
            *conformal,
            f"![exits vs FLOPs](plots/{stem}-flops.png)",
            f"![exits vs latency](plots/{stem}-latency.png)",
        ]
    )
