"""`brickwork bench grouped`: the products of a grouped linear layer, one backend against another.

An MoE step with stacked experts is six grouped products: forward (rows x weight), input
gradient (grad x weight^T) and weight gradient (rows^T x grad, one (K, M) block per expert), for
the up and the down projection. This times each kind on its own, for every backend of
:func:`brickwork.kernels.grouped_linear`'s choice plus the native ``_grouped_mm`` backward, against
one dense product of equal FLOPs (the limit), interleaved, each product in a fresh worker process
(:func:`brickwork.analysis.timing.run_cell`), ratios the median of per-round ratios [min-max]. It is how the CPU
weight-gradient path of ``kernels/grouped.py`` was chosen (``docs/moe-notes.md``).

Candidates per product:

* ``dense``: one ``mm`` of the same FLOPs (all rows against one (K, M) matrix);
* ``grouped_mm``: ``torch._grouped_mm`` (for the weight gradient: with the group offsets on K,
  as its own backward computes it);
* ``mm_out``: one ``mm`` per expert written into its slice of one output buffer (brickwork's CPU
  weight gradient);
* ``bmm``: one batched matmul over equal-size groups (uniform load only).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from brickwork.analysis.timing import describe_machine, load_average, ratio_spread, run_cell, time_rounds


def _mm_out(a_parts: list[Tensor], b_parts: list[Tensor], out: Tensor, out_parts: list[Tensor]) -> Callable[[], Tensor]:
    """One ``mm`` per group, each into its slice (``out_parts``) of one buffer ``out``."""

    def run() -> Tensor:
        for a, b, o in zip(a_parts, b_parts, out_parts, strict=True):
            torch.mm(a, b, out=o)
        return out

    return run


def product_candidates(kind: str, experts: int, rows: int, k: int, m: int) -> dict[str, Callable[[], Tensor]]:
    """Zero-argument callables computing one ``kind`` product (``forward`` or ``wgrad``) per candidate.

    ``forward``: (E * rows, k) x (E, k, m) -> (E * rows, m); an input gradient is the same shape
    of product with k and m swapped. ``wgrad``: (E * rows, k)^T x (E * rows, m) per expert -> (E, k, m).
    """
    torch.manual_seed(0)
    x, g = torch.randn(experts * rows, k), torch.randn(experts * rows, m)
    offs = torch.arange(1, experts + 1, dtype=torch.int32) * rows
    one = torch.randn(k, m)
    if kind == "forward":
        w = torch.randn(experts, k, m)
        out = torch.empty(experts * rows, m)
        return {
            "dense": lambda: x @ one,
            "grouped_mm": lambda: torch._grouped_mm(x, w, offs=offs),
            "mm_out": _mm_out(list(x.split(rows)), list(w.unbind(0)), out, list(out.split(rows))),
            "bmm": lambda: torch.bmm(x.view(experts, rows, k), w),
        }
    if kind == "wgrad":
        out = torch.empty(experts, k, m)
        return {
            "dense": lambda: x.t() @ g,
            "grouped_mm": lambda: torch._grouped_mm(x.t(), g, offs=offs),
            "mm_out": _mm_out([p.t() for p in x.split(rows)], list(g.split(rows)), out, list(out.unbind(0))),
            "bmm": lambda: torch.bmm(x.view(experts, rows, k).transpose(1, 2), g.view(experts, rows, m)),
        }
    raise ValueError(f"unknown product kind {kind!r}")


def cell(kind: str, experts: int, rows: int, k: int, m: int, repeats: int) -> dict[str, Any]:
    """One row: dense ms and every backend's time / dense as a spread."""
    t = time_rounds(product_candidates(kind, experts, rows, k, m), repeats=repeats, warmup=2)
    return {"dense_ms": 1e3 * t["dense"].median(), **{n: ratio_spread(t[n], t["dense"]) for n in t if n != "dense"}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="brickwork bench grouped", description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--rows", type=int, nargs="+", default=[64, 256], help="rows per expert")
    p.add_argument("--dim", type=int, default=512, help="d_model; the expert hidden width is 2 x dim")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument(
        "--in-process", action="store_true", help="all cells in this process (the old order), not a fresh worker each"
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc = "no-mmap"  # applied in each worker before it allocates
    print(f"machine: {describe_machine(malloc)}")
    print(
        f"{args.experts} experts; SwiGLU shapes: up {args.dim} x {4 * args.dim} (fused gate and up), "
        f"down {2 * args.dim} x {args.dim}; median of {args.repeats} interleaved repeats; ratio = time / dense"
    )
    d = args.dim
    shapes = {"up": (d, 4 * d), "down": (2 * d, d)}
    print("| product | rows/expert | dense ms | grouped_mm | mm_out | bmm |")
    print("|---|---:|---:|---:|---:|---:|")
    for rows in args.rows:
        for kind in ("forward", "wgrad"):
            for proj, (k, m) in shapes.items():
                t = run_cell(
                    cell,
                    kind,
                    args.experts,
                    rows,
                    k,
                    m,
                    args.repeats,
                    in_process=args.in_process,
                    malloc_setting=malloc,
                )
                print(
                    f"| {kind} {proj} | {rows} | {t['dense_ms']:.1f} | {t['grouped_mm']} | {t['mm_out']} "
                    f"| {t['bmm']} |",
                    flush=True,
                )
    print(f"load average after: {load_average()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
