"""`brickwork bench align`: time of weight matching (git re-basin) between two MLPs, by width.

Two independently initialised ``mlp`` models (784 inputs, ``--depth`` hidden layers of each
width, 10 classes; torch seed 0), so the coordinate descent does real work (a planted
permutation converges in one pass). Printed per width: seconds of
:func:`brickwork.ops.weight_matching` (median of ``--repeats``), and the ratio to one linear
assignment of the width (the baseline: the least one step can cost). ``--clock cpu`` times the
worker's CPU time (with ``--threads 1``: what a loaded, shared machine does not distort).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from brickwork.analysis.timing import (
    add_clock_option,
    describe_machine,
    load_average,
    named_clock,
    ratio_spread,
    run_cell,
    time_rounds,
)
from brickwork.models.mlp import mlp
from brickwork.ops.align import weight_matching


def cell(w: int, depth: int, repeats: int, clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """One width: seconds of weight matching, of one assignment, and their ratio's spread."""
    torch.manual_seed(0)
    a = mlp((784,), 10, width=w, depth=depth)
    b = mlp((784,), 10, width=w, depth=depth)
    score = np.random.default_rng(0).standard_normal((w, w))
    t = time_rounds(
        {"match": lambda: weight_matching(a, b), "lap": lambda: linear_sum_assignment(score, maximize=True)},
        repeats=repeats,
        warmup=0,
        clock=clock,
    )
    return {"match": t["match"].median(), "lap": t["lap"].median(), "ratio": ratio_spread(t["match"], t["lap"])}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    parser = argparse.ArgumentParser(prog="brickwork bench align", description=__doc__)
    parser.add_argument("--widths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (workers inherit it)")
    add_clock_option(parser, "the worker's")
    parser.add_argument(
        "--in-process", action="store_true", help="all widths in this process (the old order), not a fresh worker each"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = named_clock(args.clock)
    print(describe_machine())
    print(
        f"weight matching, mlp 784 -> {args.depth + 1} hidden layers -> 10, two random initialisations; "
        f"median of {args.repeats}, {args.clock} clock"
    )
    print("| width | permutations | seconds | one assignment (s) | ratio [min-max] |")
    print("|---|---|---|---|---|")
    for w in args.widths:
        t = run_cell(cell, w, args.depth, args.repeats, clock, in_process=args.in_process)
        print(f"| {w} | {args.depth + 1} | {t['match']:.3f} | {t['lap']:.4f} | {t['ratio']} |")
    print(f"load average after: {load_average()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
