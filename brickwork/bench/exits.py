"""`brickwork bench exits`: wall-clock saving of batched early exit against its FLOPs saving.

An early-exit model in eval mode removes exited samples from the batch, so later layers run on
fewer samples. For a range of exit rates (set by choosing the confidence threshold as a
quantile of the first exit's scores on the batch: the rate, not the model's accuracy, is what
costs time, so an untrained model serves), this prints side by side, each (case, rate) cell in
a fresh worker process (:func:`brickwork.analysis.timing.run_cell`; interleaved, warm-up, median
of per-round paired ratios with their min-max spread):

* compaction: brickwork's ``EarlyExit`` forward;
* full: the same model with threshold 1.0 (nobody exits);
* no compaction: every exit head and every layer on every sample, each sample's answer picked
  afterwards (the way many multi-exit implementations evaluate), the peer baseline;
* ideal: the same work with the staying rows taken as a prefix view of the batch (no gather),
  so ``compaction / ideal`` is the cost of moving rows.

The headline ratio is wall-clock saving / FLOPs saving (1.0: time falls as much as compute).
One exit per model, so the share of samples leaving is set exactly by the threshold.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from brickwork.analysis.compute import measure_compute
from brickwork.analysis.timing import (
    Spread,
    add_clock_option,
    describe_machine,
    load_average,
    named_clock,
    ratio_spread,
    run_cell,
    time_rounds,
)
from brickwork.models.nested import early_exit
from brickwork.nn.exits import EarlyExit

CASES: dict[str, Callable[[], tuple[EarlyExit, Tensor]]] = {
    "cnn 32-64-128 x2 blocks, exit after block 1 of 6, 28x28, batch 256": lambda: (
        early_exit(
            (1, 28, 28), 10, base={"name": "cnn", "channels": (32, 64, 128), "blocks": 2, "norm": "batch"}, exits=[1]
        ),
        torch.randn(256, 1, 28, 28),
    ),
    "vit d128 6 blocks, exit after block 1 of 6, 49 tokens, batch 256": lambda: (
        early_exit((1, 28, 28), 10, base={"name": "vit", "dim": 128, "depth": 6, "heads": 4, "patch": 4}, exits=[1]),
        torch.randn(256, 1, 28, 28),
    ),
}


def bench_case(name: str, rates: list[float], repeats: int, clock: str = "wall") -> list[dict[str, Any]]:
    torch.manual_seed(0)
    model, x = CASES[name]()
    model.eval()
    layer = model.exit_layers[0]
    with torch.no_grad():
        scores = model.score(layer, model.all_exits(x)[0])

    def no_compaction() -> Tensor:
        """Every layer on every sample, exits picked afterwards."""
        outs = model.all_exits(x)
        leave = model.score(layer, outs[0]) > model.threshold
        return torch.where(leave.view(-1, *[1] * (outs[1].dim() - 1)), outs[0], outs[1])

    def ideal(stay: int) -> Callable[[], Tensor]:
        """The same work on the staying rows without gathering them (a prefix view of the batch):
        the time compaction would take if moving rows cost nothing."""

        def run() -> Tensor:
            h = model.body.taps(model.stem(x), [layer])[0]
            z = model.exits[str(layer)](h)
            model.score(layer, z)
            rest = h[:stay]
            for block in list(model.body.layers)[layer + 1 :]:
                rest = block(rest)
            return model.head(rest)

        return run

    rows = []
    for rate in rates:
        t = float(torch.quantile(scores, 1 - rate)) if rate > 0 else 1.0
        model.threshold.fill_(min(t, 1.0))
        with torch.no_grad():
            torch.testing.assert_close(no_compaction(), model(x))  # the same answers, at different costs
            assert model.record is not None
            stay = int((model.record.layer != layer).sum())
            flops = measure_compute(model, [x]).total_flops
            model.threshold.fill_(1.0)
            full_flops = measure_compute(model, [x]).total_flops
            model.threshold.fill_(min(t, 1.0))

            def full() -> Tensor:
                return model.head(model.body(model.stem(x)))

            samples = time_rounds(
                {"compaction": lambda: model(x), "full": full, "no_compaction": no_compaction, "ideal": ideal(stay)},
                repeats=repeats,
                clock=named_clock(clock),
            )
        times = {n: t.median() for n, t in samples.items()}
        flops_saving = 1 - flops / full_flops
        paired = ratio_spread(samples["compaction"], samples["full"])  # compaction / full per round
        time_saving = 1 - paired.median
        # saving / FLOPs saving falls as compaction / full rises: the spread's ends swap.
        fs = flops_saving if flops_saving > 0 else float("nan")
        spread = Spread((1 - paired.max) / fs, time_saving / fs, (1 - paired.min) / fs, paired.rounds)
        rows.append(
            {
                "rate": 1 - stay / len(x),
                "flops_saving": flops_saving,
                "time_saving": time_saving,
                "ratio": spread,
                "full_ms": 1e3 * times["full"],
                "compaction_ms": 1e3 * times["compaction"],
                "overhead": times["compaction"] / times["ideal"],
                "no_compaction_ratio": times["no_compaction"] / times["full"],
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="brickwork bench exits", description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES), metavar="CASE")
    p.add_argument(
        "--rates",
        nargs="+",
        type=float,
        default=[0.25, 0.5, 0.75, 0.9],
        help="target share of samples leaving at the first exit",
    )
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    add_clock_option(p)
    p.add_argument(
        "--in-process", action="store_true", help="all cells in this process (the old order), not a fresh worker each"
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc = "tuned"  # raised glibc thresholds, applied in each worker before it allocates
    print(f"machine: {describe_machine(malloc)}")
    print(
        f"median of {args.repeats} interleaved repeats after warm-up, {args.clock} clock; cells: "
        f"{'all in this process' if args.in_process else 'each (case, rate) in a fresh spawned worker'}; "
        "time saving / FLOPs saving: median of per-round values [min-max]"
    )
    print(
        "| case | samples exiting early | FLOPs saved | wall-clock saved | time saving / FLOPs saving [min-max] "
        "| compaction / ideal | no compaction / full | full ms |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, rate in [(n, r) for n in args.cases for r in args.rates]:
        rows = run_cell(
            bench_case, name, [rate], args.repeats, args.clock, in_process=args.in_process, malloc_setting=malloc
        )
        for r in rows:
            print(
                f"| {name} | {r['rate']:.1%} | {r['flops_saving']:.1%} | {r['time_saving']:.1%} | {r['ratio']} "
                f"| {r['overhead']:.3f} | {r['no_compaction_ratio']:.3f} | {r['full_ms']:.1f} |",
                flush=True,
            )
    print(f"load average after: {load_average()}")
    return 0
