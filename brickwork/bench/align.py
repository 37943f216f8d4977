"""`brickwork bench align`: time of weight matching (git re-basin) between two MLPs, by width.

Two independently initialised ``mlp`` models (784 inputs, ``--depth`` hidden layers of each
width, 10 classes), so the coordinate descent does real work (a planted permutation converges
in one pass). Printed per width: seconds of :func:`brickwork.ops.weight_matching` (median of
``--repeats``), passes over the permutations it needed, and the ratio to one linear assignment
of the width (the baseline: the least one step can cost).
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy.optimize import linear_sum_assignment
from torch import nn

from brickwork.analysis.timing import describe_machine, interleaved
from brickwork.models.mlp import mlp
from brickwork.ops.align import weight_matching


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    parser = argparse.ArgumentParser(prog="brickwork bench align", description=__doc__)
    parser.add_argument("--widths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(describe_machine())
    print(f"weight matching, mlp 784 -> {args.depth + 1} hidden layers -> 10, two random initialisations")
    print("| width | permutations | seconds | one assignment (s) | ratio |")
    print("|---|---|---|---|---|")
    for w in args.widths:
        a = mlp((784,), 10, width=w, depth=args.depth)
        b = mlp((784,), 10, width=w, depth=args.depth)
        score = np.random.default_rng(0).standard_normal((w, w))

        def match(a: nn.Module = a, b: nn.Module = b) -> object:
            return weight_matching(a, b)

        def lap(s: np.ndarray = score) -> object:
            return linear_sum_assignment(s, maximize=True)

        t = interleaved({"match": match, "lap": lap}, repeats=args.repeats, warmup=0)
        print(f"| {w} | {args.depth + 1} | {t['match']:.3f} | {t['lap']:.4f} | {t['match'] / t['lap']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
