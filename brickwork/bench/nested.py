"""`brickwork bench nested`: latency of nested sub-networks against width.

For each width fraction w, side by side, each case in a fresh worker process
(:func:`brickwork.analysis.timing.run_cell`; interleaved, warm-up, median of per-round paired
ratios with their min-max spread):

* the supernet configured at w (weights sliced as views, no copy at run time),
* the sliced standalone model of the same shape (``ops.slice_model``: contiguous small tensors),
  the baseline the supernet should match within ~10%,
* forward + backward with the in-place gradient accumulation of ``nn.nested.functional``
  against plain autograd through the views (which materialises a full-size zero gradient per
  sliced weight) and against the standalone model.

It also prints the FLOPs fraction FLOPs(w) / FLOPs(1) beside the latency fraction, the R^2
of a linear fit of forward latency on FLOPs (latency should be proportional to FLOPs), and one
SortedNet step (every width's loss backpropagated into the same gradients) against the sum of
the separate small models' steps.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from brickwork.analysis.compute import subnet_flops
from brickwork.analysis.timing import (
    add_clock_option,
    describe_machine,
    load_average,
    named_clock,
    ratio_spread,
    run_cell,
    time_rounds,
)
from brickwork.models.nested import nested_cnn, nested_lm, nested_mlp
from brickwork.nn.nested import NestedModel, nested_modules, zero_written_grads
from brickwork.ops.slice import slice_model

CASES: dict[str, Callable[[], tuple[NestedModel, Tensor]]] = {
    "mlp 4x1024, batch 256": lambda: (nested_mlp((1024,), 10, width=1024, depth=4), torch.randn(256, 1024)),
    "transformer d256 8 heads ffn 1024, 2 blocks, 16x128 tokens": lambda: (
        nested_lm((128,), 256, dim=256, depth=2, heads=8),
        torch.randint(0, 256, (16, 128)),
    ),
    "cnn 64-128-256 channels, 32x32, batch 64": lambda: (
        nested_cnn((3, 32, 32), 10, channels=(64, 128, 256)),
        torch.randn(64, 3, 32, 32),
    ),
}


def _forward(model: torch.nn.Module, x: Tensor) -> Callable[[], object]:
    return lambda: model(x)


def _train_step(model: torch.nn.Module, x: Tensor) -> Callable[[], None]:
    # Gradient buffers kept and zeroed between steps (optimizer.zero_grad(set_to_none=False)), for
    # every candidate; a sliced supernet's only where the sub-network wrote (zero_written_grads):
    # a fresh full-size zero gradient per step was most of the gap at width 1/4 (docs/perf-notes.md).
    def step() -> None:
        zero_written_grads(model.parameters())
        model(x).float().square().mean().backward()

    return step


def _r2(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((a - mx) ** 2 for a in xs)
    sxy = sum((a - mx) * (b - my) for a, b in zip(xs, ys, strict=True))
    syy = sum((b - my) ** 2 for b in ys)
    return (sxy * sxy) / (sxx * syy) if sxx and syy else 1.0


def bench_case(
    name: str, widths: list[float], repeats: int, clock: str = "wall"
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """All widths and variants timed in one interleaved rotation, so every ratio is side by side.

    Returns:
        The SortedNet step (every width accumulated) as a ratio to the sum of the separate small
        models' steps, in place and through autograd views; and one row per width.
    """
    torch.manual_seed(0)
    model, x = CASES[name]()
    sliced = {w: slice_model(model, w) for w in widths}
    flops = {w: f for (w, _), f in subnet_flops(model, [x], [(w, None) for w in widths]).items()}
    for s in sliced.values():
        s.eval()

    def supernet_fwd(w: float) -> Callable[[], object]:
        def run() -> object:
            model.configure(w)
            return model(x)

        return run

    def supernet_step(w: float, inplace: bool) -> Callable[[], None]:
        step = _train_step(model, x)

        def run() -> None:
            model.configure(w)
            for m in nested_modules(model):
                if hasattr(m, "inplace_grad"):
                    setattr(m, "inplace_grad", inplace)  # noqa: B010 - a nested brick's flag, not a Module attribute
            step()

        return run

    def sorted_step(inplace: bool) -> Callable[[], None]:
        """One SortedNet step: every width's loss backpropagated into the same gradients."""

        def run() -> None:
            for m in nested_modules(model):
                if hasattr(m, "inplace_grad"):
                    setattr(m, "inplace_grad", inplace)  # noqa: B010 - a nested brick's flag, not a Module attribute
            zero_written_grads(model.parameters())
            for w in widths:
                model.configure(w)
                model(x).float().square().mean().backward()

        return run

    model.eval()
    with torch.no_grad():
        fwd_s = time_rounds(
            {
                **{f"super {w}": supernet_fwd(w) for w in widths},
                **{f"sliced {w}": _forward(sliced[w], x) for w in widths},
            },
            repeats=repeats,
            clock=named_clock(clock),
        )
    model.train()
    for s in sliced.values():
        s.train()
    bwd_s = time_rounds(
        {
            **{f"inplace {w}": supernet_step(w, True) for w in widths},
            **{f"autograd {w}": supernet_step(w, False) for w in widths},
            **{f"sliced {w}": _train_step(sliced[w], x) for w in widths},
            "sorted inplace": sorted_step(True),
            "sorted autograd": sorted_step(False),
        },
        repeats=repeats,
        clock=named_clock(clock),
    )
    fwd = {n: t.median() for n, t in fwd_s.items()}
    bwd = {n: t.median() for n, t in bwd_s.items()}
    model.configure(1.0)
    full = max(widths)
    separate = sum(bwd[f"sliced {w}"] for w in widths)
    accumulated = {"inplace": bwd["sorted inplace"] / separate, "autograd": bwd["sorted autograd"] / separate}
    return accumulated, [
        {
            "width": w,
            "flops_frac": flops[w] / flops[full],
            "fwd_ms": 1e3 * fwd[f"super {w}"],
            "latency_frac": fwd[f"super {w}"] / fwd[f"super {full}"],
            "fwd_ratio": ratio_spread(fwd_s[f"super {w}"], fwd_s[f"sliced {w}"]),
            "bwd_inplace_ratio": ratio_spread(bwd_s[f"inplace {w}"], bwd_s[f"sliced {w}"]),
            "bwd_autograd_ratio": ratio_spread(bwd_s[f"autograd {w}"], bwd_s[f"sliced {w}"]),
            "bwd_sliced_ms": 1e3 * bwd[f"sliced {w}"],
        }
        for w in widths
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="brickwork bench nested", description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES), metavar="CASE")
    p.add_argument("--widths", nargs="+", type=float, default=[0.25, 0.5, 0.75, 1.0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    add_clock_option(p)
    p.add_argument(
        "--in-process", action="store_true", help="all cases in this process (the old order), not a fresh worker each"
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc = "tuned"  # raised glibc thresholds, applied in each worker before it allocates
    print(f"machine: {describe_machine(malloc)}")
    print(
        f"median of {args.repeats} repeats after warm-up ({args.clock} clock), every width and variant of a case "
        "interleaved in one "
        f"rotation; cells: {'all in this process' if args.in_process else 'each case in a fresh spawned worker'}; "
        "ratios (median of per-round ratios [min-max]) < 1 are faster than the baseline"
    )
    print(
        "| case | width | FLOPs(w)/FLOPs(1) | fwd latency(w)/latency(1) | fwd ms | fwd supernet / sliced "
        "| fwd+bwd in-place / sliced | fwd+bwd autograd views / sliced |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in args.cases:
        accumulated, rows = run_cell(
            bench_case,
            name,
            sorted(set(args.widths) | {1.0}),
            args.repeats,
            args.clock,
            in_process=args.in_process,
            malloc_setting=malloc,
        )
        for r in rows:
            print(
                f"| {name} | {r['width']:g} | {r['flops_frac']:.3f} | {r['latency_frac']:.3f} | {r['fwd_ms']:.2f} "
                f"| {r['fwd_ratio']} | {r['bwd_inplace_ratio']} | {r['bwd_autograd_ratio']} |",
                flush=True,
            )
        r2 = _r2([r["flops_frac"] for r in rows], [r["fwd_ms"] for r in rows])
        print(f"| {name} | R^2 of forward latency on FLOPs over the widths: {r2:.4f} | | | | | | |", flush=True)
        print(
            f"| {name} | one SortedNet step, all widths accumulated / separate small models' steps | | | | "
            f"| {accumulated['inplace']:.3f} | {accumulated['autograd']:.3f} |",
            flush=True,
        )
    print(f"load average after: {load_average()}")
    return 0
