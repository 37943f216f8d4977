"""`brickwork bench distributed`: data-parallel training steps against the ideal and one process.

For a dense MLP and an MoE MLP on digits and the causal LM on Hamlet (real data, the shapes of
``configs/distributed/``), one AdamW training step on a global batch of ``B`` rows is timed:

* ``dp``: 2 processes x 1 thread (gloo, forked by :func:`brickwork.distributed.run_ranks`), each
  rank running :func:`brickwork.train.train_step` on the DDP-wrapped model (``--strategy fsdp``:
  FSDP2): its B/2 rows, the gradient all-reduce, the loss reduction;
* ``ideal``: in the same rank, interleaved with ``dp`` (one rotation, after warm-up, median of
  repeats, :func:`brickwork.analysis.timing.time_rounds`), the plain model's step on the same
  B/2 rows with no communication: half the single-process work, the best data parallelism can do;
* ``1x2``: afterwards, one process with 2 threads taking the step on all B rows.

Printed: ``dp / ideal`` (the overhead of data parallelism; the goal is <= 1.15 for the MLP and the
LM) and ``1x2 / dp`` (the speed-up of 2 processes over 2 threads). A rank's figure is the slowest
rank's median. Both ranks are always busy, so the contention filter of the other benches cannot
be used; on a shared machine the figures are noisy (the load average is printed).
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from brickwork.analysis.timing import (
    add_clock_option,
    describe_machine,
    load_average,
    named_clock,
    paired_ratio,
    run_cell,
    time_rounds,
)
from brickwork.data import load_dataset
from brickwork.distributed import DistContext, run_ranks, shard_batch, wrap
from brickwork.distributed.data_parallel import DataParallel
from brickwork.models import mlp, moe_mlp, transformer_lm
from brickwork.train import cross_entropy, train_step

# name -> (builder, arguments, dataset, dataset arguments, global batch)
CASES: dict[str, tuple[Callable[..., nn.Module], dict[str, Any], str, dict[str, Any], int]] = {
    "mlp": (mlp, {"width": 256, "depth": 3}, "digits", {}, 128),
    "moe": (moe_mlp, {"width": 128, "depth": 2, "hidden": 128, "num_experts": 8}, "digits", {}, 128),
    "lm": (transformer_lm, {"dim": 64, "depth": 2, "heads": 4, "mlp_ratio": 4}, "hamlet", {"seq_len": 64}, 32),
}
LOSS = cross_entropy()
# ``--clock``: wall-clock time (the goal's measure), or the process's CPU time (``named_clock``:
# the compute and gloo's threads' work, not the waiting for the other rank; on a loaded machine
# it shows how much of a step's cost is work at all).


def _setup(case: str, x: Tensor, y: Tensor) -> tuple[nn.Module, torch.optim.Optimizer]:
    build, args, *_ = CASES[case]
    torch.manual_seed(0)
    model = build(in_shape=tuple(x.shape[1:]), num_classes=int(y.max()) + 1, **args)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _rank(
    ctx: DistContext,
    case: str,
    x: Tensor,
    y: Tensor,
    strategy: str,
    repeats: int,
    breakdown: bool = False,
    clock: str = "wall",
) -> dict[str, Any]:
    model, _ = _setup(case, x, y)
    alone = copy.deepcopy(model)
    engine = wrap(model, ctx, strategy)  # type: ignore[arg-type]
    opt = torch.optim.AdamW(engine.parameters(), lr=1e-3)
    opt_alone = torch.optim.AdamW(alone.parameters(), lr=1e-3)
    xr, yr, _ = shard_batch(ctx, x, y)  # the ideal rank's rows: the same B/2
    if breakdown:  # copied before any step: a trained module holds its last forward's tensors
        lean = DataParallel(copy.deepcopy(alone), ctx, "ddp", find_unused_parameters=False)
        opt_lean = torch.optim.AdamW(lean.parameters(), lr=1e-3)
        apart = DataParallel(copy.deepcopy(alone), ctx, "ddp", fuse_scalars=False)  # the scalars' own all-reduce
        opt_apart = torch.optim.AdamW(apart.parameters(), lr=1e-3)
    samples = time_rounds(
        {
            "dp": lambda: train_step(engine, x, y, LOSS, opt),
            "ideal": lambda: train_step(alone, xr, yr, LOSS, opt_alone),
        },
        repeats=repeats,
        warmup=3,
        clock=named_clock(clock),
    )
    out = {
        "dp": samples["dp"].median(),
        "ideal": samples["ideal"].median(),
        "ratio": paired_ratio(samples["dp"], samples["ideal"]),
    }
    if breakdown:
        # Where the time goes, in rounds of their own: every candidate here makes collectives, so
        # the ranks stay in step (after the communication-free ideal, the next collective would
        # absorb the ranks' skew). The same step without DDP's graph search, paired with dp; gloo alone.
        grads = torch.zeros(sum(p.numel() for p in alone.parameters()))  # the gradient bytes, float32
        scalars = torch.zeros(2, dtype=torch.float64)  # the step's loss and skip flag
        parts = time_rounds(
            {
                "dp": lambda: train_step(engine, x, y, LOSS, opt),
                "dp_no_search": lambda: train_step(lean, x, y, LOSS, opt_lean),
                "dp_apart": lambda: train_step(apart, x, y, LOSS, opt_apart),
                "grad_allreduce": lambda: dist.all_reduce(grads, group=ctx.group),
                "scalar_allreduce": lambda: dist.all_reduce(scalars, group=ctx.group),
            },
            repeats=repeats,
            warmup=3,
            clock=named_clock(clock),
        )
        out.update({k: parts[k].median() for k in _PARTS})
        out["search_ratio"] = paired_ratio(parts["dp_no_search"], parts["dp"])
        out["apart_ratio"] = paired_ratio(parts["dp_apart"], parts["dp"])
    return out


#: The breakdown's timed parts besides the dp step (their medians are reported in ms).
_PARTS = ("dp_no_search", "dp_apart", "grad_allreduce", "scalar_allreduce")


def bench_case(
    case: str,
    strategy: str = "ddp",
    repeats: int = 15,
    breakdown: bool = False,
    batch: int | None = None,
    clock: str = "wall",
) -> dict[str, Any]:
    """Median step seconds of ``dp``, ``ideal`` and ``1x2`` for ``case``, and the ratios.

    ``batch``: the global batch (default: the case's); rows cycle through the data if it is larger.
    ``clock``: ``wall`` or ``cpu`` (:func:`~brickwork.analysis.timing.named_clock`; ``cpu``: the
    process's CPU seconds, ``1x2`` then sums both threads).

    With ``breakdown``, also (ms, slowest rank's median, in rounds of their own):
    ``dp_no_search_ms``, the DDP step with ``find_unused_parameters`` off, and ``search_ratio``,
    its paired ratio to the dp step in those rounds; ``dp_apart_ms`` and ``apart_ratio``, the same
    for the DDP step whose scalars get their own all-reduce instead of riding in the gradient
    bucket (``fuse_scalars=False``); ``grad_allreduce_ms``, a gloo all-reduce of the model's
    parameter count in float32 alone (the floor of DDP's gradient traffic: 2 ranks, one
    message); ``scalar_allreduce_ms``, the step's small all-reduce alone.
    """
    _, _, data, data_args, default = CASES[case]
    batch = batch or default
    ds = load_dataset(data, seed=0, **data_args)
    rows = torch.arange(batch) % len(ds.train.x)
    x, y = ds.train.x[rows], ds.train.y[rows]
    per_rank = run_ranks(_rank, 2, case, x, y, strategy, repeats, breakdown, clock, timeout_s=900.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model, opt = _setup(case, x, y)
        step = {"1x2": lambda: train_step(model, x, y, LOSS, opt)}
        one = time_rounds(step, repeats=repeats, warmup=3, clock=named_clock(clock))["1x2"]
    finally:
        torch.set_num_threads(threads)
    dp = max(r["dp"] for r in per_rank)
    return {
        "case": case,
        "strategy": strategy,
        "batch": batch,
        "dp_ms": 1e3 * dp,
        "ideal_ms": 1e3 * max(r["ideal"] for r in per_rank),
        "ratio": max(r["ratio"] for r in per_rank),
        "one_ms": 1e3 * one.median(),
        "speedup": one.median() / dp,
        **{f"{k}_ms": 1e3 * max(r[k] for r in per_rank) for k in _PARTS if breakdown},
        **{k: max(r[k] for r in per_rank) for k in ("search_ratio", "apart_ratio") if breakdown},
    }


#: Message sizes (bytes) of the gloo floor: a 2-rank all-reduce of each, alone.
FLOOR_BYTES = (8, 4096, 65536, 1 << 20, 4 << 20, 16 << 20)


def _floor_rank(ctx: DistContext, repeats: int) -> dict[int, float]:
    bufs = {n: torch.zeros(n // 4) for n in FLOOR_BYTES}  # float32
    steps = {str(n): (lambda b=bufs[n]: dist.all_reduce(b, group=ctx.group)) for n in FLOOR_BYTES}
    samples = time_rounds(steps, repeats=repeats, warmup=3)
    return {n: samples[str(n)].median() for n in FLOOR_BYTES}


def gloo_floor(repeats: int = 21) -> str:
    """A markdown table: a 2-rank gloo all-reduce of N float32 bytes, alone (slowest rank's median)."""
    per_rank = run_ranks(_floor_rank, 2, repeats, timeout_s=900.0)
    lines = ["| bytes | all-reduce ms | GB/s |", "|---:|---:|---:|"]
    for n in FLOOR_BYTES:
        t = max(r[n] for r in per_rank)
        lines.append(f"| {n:,} | {1e3 * t:.3f} | {n / t / 1e9:.3f} |")
    return "\n".join(lines)


_BREAKDOWN = (("dp_no_search_ms", "dp, no unused search ms"), ("search_ratio", "no search / dp"),
              ("dp_apart_ms", "dp, scalars apart ms"), ("apart_ratio", "apart / dp"),
              ("grad_allreduce_ms", "grad all-reduce ms"), ("scalar_allreduce_ms", "scalar all-reduce ms"))  # fmt: skip


def _table(rows: list[dict[str, Any]]) -> str:
    extra = [(k, name) for k, name in _BREAKDOWN if k in rows[0]]
    head = "| model | strategy | batch | 2x1 dp ms | ideal ms | dp / ideal | 1x2 ms | 1x2 / dp |"
    head += "".join(f" {name} |" for _, name in extra)
    lines = [head, "|---|---|---|---|---|---|---|---|" + "---|" * len(extra)]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['strategy']} | {r['batch']} | {r['dp_ms']:.2f} | {r['ideal_ms']:.2f} | "
            f"{r['ratio']:.3f} | {r['one_ms']:.2f} | {r['speedup']:.2f} |" + "".join(f" {r[k]:.2f} |" for k, _ in extra)
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a markdown table; returns the exit status."""
    parser = argparse.ArgumentParser(prog="brickwork bench distributed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="mlp,moe,lm", help="comma-separated: " + ", ".join(CASES))
    parser.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batch", type=int, default=None, help="global batch of every case (default: each case's own)")
    add_clock_option(parser, "each rank's")
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="also time the DDP step without find_unused_parameters, with the scalars' own all-reduce, and"
        " the bare gloo all-reduces (ddp only)",
    )
    parser.add_argument(
        "--in-process", action="store_true", help="all cases from this process (the old order), not a fresh worker each"
    )
    args = parser.parse_args(argv)
    cases = [c.strip() for c in args.models.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown model {unknown}; expected some of {', '.join(CASES)}")
    print(f"machine: {describe_machine()}; ranks 1 thread each, gloo")
    print(f"cells: {'all from this process' if args.in_process else 'each case from a fresh spawned worker'}")
    print(
        f"clock: {args.clock}"
        + (" (process CPU time: work, not waiting; the floor stays wall-clock)" if args.clock == "cpu" else "")
    )
    rows = []
    for case in cases:
        breakdown = args.breakdown and args.strategy == "ddp"
        rows.append(
            run_cell(
                bench_case,
                case,
                args.strategy,
                args.repeats,
                breakdown,
                args.batch,
                args.clock,
                in_process=args.in_process,
            )
        )
        print(_table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(_table(rows))
    if args.breakdown:
        print("\ngloo's floor on this machine: a 2-rank all-reduce of N bytes alone")
        print(gloo_floor(max(args.repeats, 5)))
    print(f"\nload average after: {load_average()}")
    return 0
