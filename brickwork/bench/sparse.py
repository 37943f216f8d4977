"""`brickwork bench sparse`: group-connected linear against the dense layer and against masked dense.

Density is the fraction of weights kept (sparsity = 1 - density); a group-connected layer at
density d connects d * G of the G input groups to each output group. Three candidates per
shape, timed side by side (interleaved, warm-up, median of per-round paired ratios with their
min-max spread), each cell in a fresh worker process (:func:`brickwork.analysis.timing.run_cell`):

* ``dense``: ``nn.Linear`` of the same shape (the baseline of equal *total* FLOPs);
* ``masked``: a dense weight times a 0/1 mask every call, ``F.linear(x, W * M)``, as most
  dynamic-sparse-training code runs (its speed-up over dense is none);
* ``sparse``: :class:`~brickwork.nn.sparse.GroupLinear`, its product path (gather + batched
  matmul, strided band view, or dense with the mask folded in) chosen by measurement
  (:mod:`brickwork.kernels.autotune`) and printed in the ``backend`` column.

The limit of ``sparse / dense`` is the density (only connected blocks are multiplied). Two
wirings: ``random`` (regular random: the general gather path, as after any rewiring) and
``ring`` (banded: the strided-view path, no gather). Groups hold ``--block`` units (256 by
default: smaller blocks make smaller, less efficient matmuls). Before timing, the sparse
layer's output is checked against the masked dense one (``max abs err``).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from typing import Any, get_args

import torch
import torch.nn.functional as F

from brickwork.analysis.timing import describe_machine, load_average, ratio_spread, run_cell, time_rounds
from brickwork.kernels.autotune import backends_used
from brickwork.nn.sparse import GroupLinear, Pattern


def candidates(
    size: int, batch: int, density: float, groups: int, backward: bool, pattern: Pattern = "random"
) -> tuple[dict[str, Callable[[], object]], float]:
    """The three zero-argument callables for one shape, and max |sparse - masked| of their outputs."""
    torch.manual_seed(0)
    sparse = GroupLinear(size, size, groups=groups, density=density, pattern=pattern)
    dense = torch.nn.Linear(size, size)
    weight = torch.nn.Parameter(sparse.dense_weight().clone())
    mask = sparse.connectivity_mask().float()
    x = torch.randn(batch, size, requires_grad=backward)
    with torch.no_grad():
        err = float((sparse(x) - F.linear(x, weight * mask, sparse.bias)).abs().max())
    fns: dict[str, Callable[[], torch.Tensor]] = {
        "dense": lambda: dense(x),
        "masked": lambda: F.linear(x, weight * mask, sparse.bias),
        "sparse": lambda: sparse(x),
    }
    if not backward:

        def no_grad(f: Callable[[], torch.Tensor]) -> Callable[[], object]:
            def run() -> object:
                with torch.no_grad():
                    return f()

            return run

        return {n: no_grad(f) for n, f in fns.items()}, err
    grad = torch.randn(batch, size)
    params = [x, weight, *sparse.parameters(), *dense.parameters()]

    def step(f: Callable[[], torch.Tensor]) -> Callable[[], object]:
        def run() -> object:
            f().backward(grad)
            for p in params:
                p.grad = None
            return None

        return run

    return {n: step(f) for n, f in fns.items()}, err


def _repeats(fn: Callable[[], object], at_least: int, seconds: float) -> int:
    """Repeats so that small shapes get a median over enough calls to ride out scheduler noise."""
    fn()
    t0 = time.perf_counter()
    fn()
    return max(at_least, min(50, math.ceil(seconds / max(time.perf_counter() - t0, 1e-6))))


def cell(
    size: int,
    batch: int,
    density: float,
    groups: int,
    backward: bool,
    pattern: Pattern,
    repeats: int,
    min_seconds: float,
) -> dict[str, Any]:
    """One row of the table: dense time, the spreads of sparse/dense, masked/dense, masked/sparse."""
    fns, err = candidates(size, batch, density, groups, backward, pattern)
    fns["sparse"]()  # the first call chooses the product path (measured once per class, cached)
    t = time_rounds(fns, repeats=_repeats(fns["dense"], repeats, min_seconds), warmup=1)
    return {
        "dense_ms": 1e3 * t["dense"].median(),
        "sparse/dense": ratio_spread(t["sparse"], t["dense"]),
        "masked/dense": ratio_spread(t["masked"], t["dense"]),
        "masked/sparse": ratio_spread(t["masked"], t["sparse"]),
        "err": err,
        "backend": backends_used("sparse", "fwd+bwd" if backward else "fwd"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="brickwork bench sparse", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096], help="square layer widths")
    p.add_argument("--batches", type=int, nargs="+", default=[256, 2048])
    p.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.25], help="fraction of weights kept")
    p.add_argument("--block", type=int, default=256, help="units per group (groups = width / block)")
    p.add_argument("--groups", type=int, default=None, help="a fixed group count instead of --block")
    p.add_argument(
        "--patterns",
        nargs="+",
        default=["random", "ring"],
        choices=get_args(Pattern),
        help="block connectivity: random takes the gather path, ring/band the strided-view path",
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--min-seconds",
        type=float,
        default=2.0,
        help="more repeats (up to 50) for small shapes, until the dense candidate runs about this long",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="width 1024, batch 256 only, 3 repeats")
    p.add_argument(
        "--in-process", action="store_true", help="all cells in this process (the old order), not a fresh worker each"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.batches, args.repeats, args.min_seconds = [1024], [256], 3, 0.5
    if args.threads:
        torch.set_num_threads(args.threads)
    # Large gathers and gradients are above glibc's 32 MiB mmap cap; serve them from the heap
    # (set in each worker before it allocates anything).
    malloc = "no-mmap"
    print(f"machine: {describe_machine(malloc)}")
    split = f"{args.groups} groups" if args.groups else f"groups of {args.block} units"
    print(
        f"{split}; cells: {'all in this process' if args.in_process else 'each in a fresh spawned worker'}; "
        f"median of {args.repeats} or more rounds (small shapes: up to 50), 1 warm-up round; "
        "ratios are time / dense time (lower is faster) "
        "and masked / sparse (speed-up), medians of per-round ratios [min-max]; "
        "backend: the sparse product path chosen"
    )
    print(
        "| width | groups | batch | density (sparsity) | pattern | pass | dense ms | sparse/dense | masked/dense | "
        "masked/sparse | limit sparse/dense | max abs err | backend |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        groups = args.groups or max(size // args.block, 1)
        for batch in args.batches:
            for density in args.densities:
                for pattern in args.patterns:
                    for backward in (False, True):
                        r = run_cell(
                            cell,
                            size,
                            batch,
                            density,
                            groups,
                            backward,
                            pattern,
                            args.repeats,
                            args.min_seconds,
                            in_process=args.in_process,
                            malloc_setting=malloc,
                        )
                        kind = "fwd+bwd" if backward else "fwd"
                        print(
                            f"| {size} | {groups} | {batch} | {density:g} ({1 - density:.0%}) | {pattern} | {kind} | "
                            f"{r['dense_ms']:.2f} | {r['sparse/dense']} | {r['masked/dense']} | "
                            f"{r['masked/sparse']} | {density:g} | {r['err']:.1e} | {r['backend']} |",
                            flush=True,
                        )
    print(f"load average after: {load_average()}")
    return 0
