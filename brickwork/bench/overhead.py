"""`brickwork bench overhead`: the runner's training step against a hand-written PyTorch loop.

Both train identical copies of the same model on the same batches in the same order; the
runner side is :func:`brickwork.train.run_epoch` exactly as the ``train`` stage calls it
(learning-rate schedule, auxiliary-loss collection, per-step metrics, progress-bar update),
the baseline is the five-line loop a person writes by hand. Ratio = runner / hand-written: the
median of per-round paired ratios, with their min-max spread; each model runs in a fresh worker
process (:func:`brickwork.analysis.timing.run_cell`; ``--in-process`` for the old shared process).
"""

from __future__ import annotations

import argparse
import copy
import io
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import brickwork.models  # noqa: F401  (registers the model names bench_model looks up)
from brickwork.analysis.timing import (
    add_clock_option,
    describe_machine,
    load_average,
    named_clock,
    ratio_spread,
    run_cell,
    time_rounds,
)
from brickwork.data import load_dataset
from brickwork.data.batching import batches, epoch_order, num_batches
from brickwork.registry import REGISTRY
from brickwork.train import FitConfig, build_loss, run_epoch
from brickwork.train.loop import show_step


def bench_model(
    name: str, dataset: str, batch_size: int, repeats: int, clock: Callable[[], float] = time.perf_counter
) -> dict[str, Any]:
    data = load_dataset(dataset, seed=0)
    entry = REGISTRY.get("model", name)
    torch.manual_seed(0)
    base = entry.obj(in_shape=data.in_shape, num_classes=data.num_classes)
    # Both sides train a copy: the model as built trained slower than its deepcopy in one
    # ad-hoc measurement (mlp-small, AMD EPYC, one thread, CPU clock: about +0.1 of the ratio),
    # which the runner side used to carry alone (docs/benchmarks.md, leaner step).
    runner_model, hand_model = copy.deepcopy(base), copy.deepcopy(base)
    runner_opt = torch.optim.AdamW(runner_model.parameters(), lr=1e-3)
    hand_opt = torch.optim.AdamW(hand_model.parameters(), lr=1e-3)
    x, y = data.train.x, data.train.y
    cfg = FitConfig(epochs=1, batch_size=batch_size, seed=0)
    loss_fn = build_loss("cross_entropy")
    order = epoch_order(len(x), 0, 0)
    steps = num_batches(len(x), batch_size)
    # A live progress bar (into a buffer): the runner's worst case, as in a terminal.
    bar = tqdm(total=10**9, file=io.StringIO(), mininterval=0.1)

    def runner() -> None:
        run_epoch(
            runner_model,
            batches(x, y, batch_size, order=order),
            loss_fn,
            runner_opt,
            cfg,
            step0=0,
            total_steps=steps,
            on_step=lambda r: show_step(bar, r),
        )

    def hand_written() -> None:
        hand_model.train()
        for xb, yb in batches(x, y, batch_size, order=order):
            hand_opt.zero_grad()
            loss = F.cross_entropy(hand_model(xb), yb)
            loss.backward()
            hand_opt.step()

    t = time_rounds({"runner": runner, "hand": hand_written}, repeats=repeats, warmup=1, clock=clock)
    return {
        "runner_ms_per_step": 1e3 * t["runner"].median() / steps,
        "hand_ms_per_step": 1e3 * t["hand"].median() / steps,
        "ratio": ratio_spread(t["runner"], t["hand"]),
        "steps": steps,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="brickwork bench overhead", description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["mlp-small", "cnn-tiny", "vit-tiny"])
    p.add_argument("--dataset", default="mnist5k")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's; workers inherit it)")
    add_clock_option(p, "the worker's")
    p.add_argument(
        "--in-process", action="store_true", help="all models in this process (the old order), not a fresh worker each"
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = named_clock(args.clock)
    print(f"machine: {describe_machine()}")
    print(
        f"data: {args.dataset}, batch {args.batch_size}, one epoch per repeat, "
        f"{args.repeats} rounds after warm-up, {args.clock} clock; "
        f"cells: {'all in this process' if args.in_process else 'each model in a fresh spawned worker'}; "
        "ratio: median of per-round runner / hand ratios [min-max]"
    )
    print("| model | runner ms/step | hand-written ms/step | ratio (runner / hand) [min-max] |")
    print("|---|---|---|---|")
    for name in args.models:
        r = run_cell(bench_model, name, args.dataset, args.batch_size, args.repeats, clock, in_process=args.in_process)
        print(f"| {name} | {r['runner_ms_per_step']:.3f} | {r['hand_ms_per_step']:.3f} | {r['ratio']} |", flush=True)
    print(f"load average after: {load_average()}")
    return 0
