"""`brickwork bench moe`: brickwork's MoE FFN against the dense FFN of equal active FLOPs and
against the loop-over-experts design of the common Hugging Face blocks.

For every configuration (tokens, d_model, experts, top-k, forward or forward+backward) the
modules are timed side by side in one process, interleaved, after warm-up, median of repeats:

* ``moe``: :func:`brickwork.nn.moe.moe_ffn` (top-k softmax router, stacked SwiGLU experts,
  dropless, tokens permuted once, grouped matmul);
* ``dense``: a SwiGLU :class:`~brickwork.nn.ffn.FeedForward` with hidden ``top_k * expert_hidden``,
  i.e. the same active FLOPs without the router: the limit a routed layer can reach;
* ``loop``: ``for e in range(E): idx = where(selected == e); out.index_add_(0, idx, expert(x[idx]) * w)``
  as in transformers' Mixtral blocks (same router, same expert weights), in both of their
  layouts: stacked 3-D expert weights indexed per expert (transformers 5) and a module list
  (transformers 4).

Printed ratios: ``moe / dense`` (1.0 = as fast as the dense limit) and ``loop / moe`` (how many
times faster brickwork is than each loop), each the median of per-round paired ratios with their
min-max spread. Every cell runs in a fresh worker process (:func:`brickwork.analysis.timing.run_cell`;
``--in-process`` restores the old shared process, where an earlier cell's heap and caches changed
a later cell's answer). ``moe`` and ``dense`` are interleaved in one rotation,
``moe`` and the loops in a second one (the loops' memory churn otherwise lands on ``moe``; see
:func:`bench_one`). glibc malloc is tuned first so large blocks are reused
instead of fresh zero-filled mmap pages (see :mod:`brickwork.kernels.malloc`; with 64 experts the
expert weight gradients alone are 384 MiB per step at d_model 512); by default (``--malloc auto``)
the setting is chosen by measurement per shape class (:func:`brickwork.kernels.malloc.choose_malloc`:
moe's step timed in a fresh process per setting, :func:`moe_step_seconds`), applied at the start of
the cell's worker and, like the grouped-matmul backend (:mod:`brickwork.kernels.autotune`), printed
per cell.
Samples taken while other processes used the CPUs are discarded
(:func:`brickwork.analysis.timing.time_rounds` with ``max_foreign``).
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brickwork.analysis.timing import (
    Spread,
    describe_machine,
    isolated,
    load_average,
    ratio_spread,
    run_cell,
    time_rounds,
)
from brickwork.kernels.autotune import backends_used, wall_timer
from brickwork.kernels.malloc import choose_malloc, set_malloc
from brickwork.nn.ffn import FeedForward
from brickwork.nn.moe import MoE, moe_ffn
from brickwork.nn.routing import MoESettings
from brickwork.nn.routing.experts import GroupedFFNExperts
from brickwork.nn.routing.topk import TopKRouter


class LoopMoE(nn.Module):
    """The loop-over-experts blocks of common Hugging Face MoE code.

    Router: softmax, top-k, renormalise (Mixtral). Each expert gathers its tokens from the full
    token set with ``torch.where`` on a one-hot mask, runs, and scatters back with
    ``index_add_``. Two expert layouts, both as transformers writes them:

    * ``stacked=False``: an ``nn.ModuleList`` of SwiGLU experts (Mixtral before transformers 5);
    * ``stacked=True``: 3-D ``gate_up_proj`` (E, 2H, D) and ``down_proj`` (E, D, H) indexed per
      expert inside the loop (``MixtralExperts`` in transformers 5). Indexing a stacked weight
      makes autograd build a full-size zero gradient of the whole stack per expert.
    """

    def __init__(self, dim: int, hidden: int, num_experts: int, top_k: int, stacked: bool = False) -> None:
        super().__init__()
        self.top_k, self.num_experts, self.stacked = top_k, num_experts, stacked
        self.gate = nn.Linear(dim, num_experts, bias=False)
        if stacked:
            self.gate_up_proj = nn.Parameter(torch.randn(num_experts, 2 * hidden, dim) / dim**0.5)
            self.down_proj = nn.Parameter(torch.randn(num_experts, dim, hidden) / hidden**0.5)
        else:
            self.experts = nn.ModuleList(
                FeedForward(dim, hidden, act="silu", glu=True, bias=False) for _ in range(num_experts)
            )

    def _expert(self, e: int, x: Tensor) -> Tensor:
        if not self.stacked:
            return self.experts[e](x)
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down_proj[e])

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        weights, selected = torch.topk(probs, self.top_k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        mask = F.one_hot(selected, self.num_experts).permute(2, 1, 0)  # (E, k, N)
        for e in range(self.num_experts):
            slot, idx = torch.where(mask[e])
            if idx.numel() == 0:
                continue
            out.index_add_(0, idx, self._expert(e, x[idx]) * weights[idx, slot, None])
        return out.reshape(shape)


def stacked_from_modules(loop: LoopMoE) -> LoopMoE:
    """The transformers-5 layout of a ModuleList loop block, with the same weights."""
    ffs = cast(list[FeedForward], list(loop.experts))  # the ModuleList layout holds FeedForward experts
    dim, hidden = ffs[0].up.in_features, ffs[0].up.out_features
    out = LoopMoE(dim, hidden, loop.num_experts, loop.top_k, stacked=True)
    with torch.no_grad():
        out.gate.weight.copy_(loop.gate.weight)
        # FeedForward's ``up`` carries the activation (Mixtral's w1 / gate), ``gate`` is the linear w3.
        # glu=True experts: ``gate`` is an nn.Linear, never None.
        out.gate_up_proj.copy_(torch.stack([torch.cat([f.up.weight, cast(nn.Linear, f.gate).weight]) for f in ffs]))
        out.down_proj.copy_(torch.stack([f.down.weight for f in ffs]))
    return out


def brickwork_from_loop(loop: LoopMoE) -> MoE:
    """brickwork's MoE with a ModuleList loop block's exact weights (so both compute the same function)."""
    bank = GroupedFFNExperts.from_feed_forward(cast(list[FeedForward], list(loop.experts)))
    moe = moe_ffn(bank.dim, bank.hidden, loop.num_experts, MoESettings(top_k=loop.top_k), act="silu", glu=True)
    with torch.no_grad():
        # moe_ffn's default settings build a TopKRouter and a GroupedFFNExperts bank.
        cast(TopKRouter, moe.router).proj.weight.copy_(loop.gate.weight)
        experts = cast(GroupedFFNExperts, moe.experts)
        experts.w_in.copy_(bank.w_in)
        experts.w_out.copy_(bank.w_out)
    return moe


@dataclass
class Result:
    tokens: int
    dim: int
    experts: int
    top_k: int
    mode: str
    seconds: dict[str, float]  # median over clean samples
    ratios: dict[tuple[str, str], Spread]  # paired per-round ratios: min / median / max
    clean: int  # fewest clean samples any candidate got
    backend: str = "-"  # grouped-matmul backend(s) moe used, and the malloc setting

    def ratio(self, name: str, base: str) -> float | None:
        s = self.ratios.get((name, base))
        return None if s is None else s.median

    def spread(self, name: str, base: str) -> Spread | None:
        return self.ratios.get((name, base))


def _step(module: nn.Module, x: Tensor, grad: Tensor | None) -> Callable[[], None]:
    params = list(module.parameters())

    def run() -> None:
        if grad is None:
            with torch.no_grad():
                module(x)
            return
        for p in params:
            p.grad = None  # as optimizer.zero_grad() does: fresh gradient buffers every step
        module(x).backward(grad)

    return run


def _modules(tokens: int, dim: int, experts: int, top_k: int) -> tuple[LoopMoE, MoE, Tensor]:
    """The loop baseline (seed 0), brickwork's MoE with its weights, and the input (tokens, dim)."""
    torch.manual_seed(0)
    by_modules = LoopMoE(dim, 2 * dim, experts, top_k)
    return by_modules, brickwork_from_loop(by_modules), torch.randn(tokens, dim)


def moe_step_seconds(tokens: int, dim: int, experts: int, top_k: int, mode: str, rounds: int = 3) -> float:
    """The fastest of ``rounds`` timed steps of the cell's MoE after one warm-up step: what
    :func:`~brickwork.kernels.malloc.choose_malloc` compares, each setting in a fresh process."""
    _, moe, x = _modules(tokens, dim, experts, top_k)
    step = _step(moe.train(), x, torch.randn(tokens, dim) if mode == "fwd+bwd" else None)
    step()  # the grouped-matmul backend (measured once, cached) and the first allocations
    return min(wall_timer("moe", step) for _ in range(rounds))


def bench_one(
    tokens: int,
    dim: int,
    experts: int,
    top_k: int,
    mode: str,
    repeats: int,
    warmup: int,
    loops: Sequence[str],
    max_foreign: float = 0.05,
    max_rounds: int | None = None,
    malloc: str = "auto",
) -> Result:
    """Time moe, dense and the requested loop baselines (``"modules"``, ``"stacked"``) on one shape.

    ``malloc``: a :data:`brickwork.kernels.malloc.SETTINGS` name (applied before anything is
    built), ``auto`` (the one measured fastest for moe's step, each setting in a fresh process,
    :func:`~brickwork.kernels.malloc.choose_malloc`; cached per machine and shape class), or
    ``keep`` (as the process has it).
    """
    if malloc == "auto":
        malloc = choose_malloc(
            lambda s: isolated(moe_step_seconds, tokens, dim, experts, top_k, mode, malloc_setting=s),
            (tokens, dim, experts, top_k),
            mode,
        )
    malloc_text = "as set" if malloc == "keep" else set_malloc(malloc)
    by_modules, moe, x = _modules(tokens, dim, experts, top_k)
    dense = FeedForward(dim, 2 * top_k * dim, act="silu", glu=True, bias=False)
    baselines = {"loop_modules": by_modules} if "modules" in loops else {}
    if "stacked" in loops:
        baselines["loop_stacked"] = stacked_from_modules(by_modules)
    with torch.no_grad():  # a baseline is a fair one only if it computes the same function
        sample = x[:256]
        for b in baselines.values():
            torch.testing.assert_close(moe(sample), b(sample), rtol=1e-4, atol=1e-4)
    grad = torch.randn(tokens, dim) if mode == "fwd+bwd" else None
    run_moe = _step(moe.train(), x, grad)
    # Two rotations: moe against the dense limit, then moe against the loop baselines. In one
    # shared rotation the stacked loop's full-size gradient per expert (GBs per step at 64
    # experts) churns the heap and caches for whichever candidate runs next, and moe, whose
    # stacked gradients are also large blocks, paid for it: moe / dense measured 1.35 / 1.68
    # (8192 / 2048 tokens x 64 experts) with the loops in the rotation, 1.20 / 1.55 without.
    rotations = [{"moe": run_moe, "dense": _step(dense.train(), x, grad)}]
    if baselines:
        rotations.append({"moe": run_moe, **{name: _step(b.train(), x, grad) for name, b in baselines.items()}})
    timings_per = [
        time_rounds(c, repeats=repeats, warmup=warmup, max_foreign=max_foreign, max_rounds=max_rounds)
        for c in rotations
    ]
    ratios = {("moe", "dense"): ratio_spread(timings_per[0]["moe"], timings_per[0]["dense"], max_foreign)}
    for name in baselines:
        ratios[(name, "moe")] = ratio_spread(timings_per[1][name], timings_per[1]["moe"], max_foreign)
    timings = {**(timings_per[1] if baselines else {}), **timings_per[0]}  # moe's time from the dense rotation
    seconds = {n: t.median(max_foreign) for n, t in timings.items()}
    clean = min(len(t.clean(max_foreign)) for tp in timings_per for t in tp.values())
    backend = f"{backends_used('moe', mode)}; malloc {_malloc_name(malloc_text)}"
    return Result(tokens, dim, experts, top_k, mode, seconds, ratios, clean, backend)


def _malloc_name(text: str) -> str:
    """The short name of a malloc description (``no-mmap``, ``tuned``, ``default``)."""
    if "M_MMAP_MAX=0" in text:
        return "no-mmap"
    return "tuned" if "M_MMAP_THRESHOLD" in text else "default" if "defaults" in text else text


def _fmt(v: float | None, spec: str, suffix: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{suffix}"


def _spread(s: Spread | None, spec: str, suffix: str = "") -> str:
    return "-" if s is None else f"{s.median:{spec}}{suffix} [{s.min:{spec}}-{s.max:{spec}}]"


def _table(results: Sequence[Result]) -> str:
    lines = [
        "| tokens | d_model | experts | top-k | pass | moe ms | dense ms | moe / dense [min-max] "
        "| loop (stacked) / moe | loop (modules) / moe | clean | backend |",
        "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.tokens} | {r.dim} | {r.experts} | {r.top_k} | {r.mode} | {1e3 * r.seconds['moe']:.1f} | "
            f"{1e3 * r.seconds['dense']:.1f} | {_spread(r.spread('moe', 'dense'), '.2f')} | "
            f"{_spread(r.spread('loop_stacked', 'moe'), '.1f', 'x')} | "
            f"{_spread(r.spread('loop_modules', 'moe'), '.1f', 'x')} | {r.clean} | {r.backend} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a markdown table of ratios; returns the exit status."""
    parser = argparse.ArgumentParser(prog="brickwork bench moe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a subset: d_model 512, top-2, fwd+bwd")
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--dims", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--top-k", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--modes", nargs="+", choices=["fwd", "fwd+bwd"], default=["fwd", "fwd+bwd"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--loops",
        nargs="*",
        choices=["stacked", "modules"],
        default=["stacked", "modules"],
        help="loop-over-experts baselines: transformers-5 stacked weights, transformers-4 module list",
    )
    parser.add_argument(
        "--max-foreign",
        type=float,
        default=0.05,
        help="discard samples during which other processes used more than this share of the CPUs",
    )
    parser.add_argument("--max-rounds", type=int, default=None, help="rounds at most (default 3 * repeats)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--malloc",
        choices=["auto", "no-mmap", "tuned", "default"],
        default="auto",
        help="glibc malloc: measured per shape class (auto, default; BRICKWORK_BACKEND=malloc=... pins it), "
        "raised mmap/trim thresholds and no mmap at all (no-mmap), raised thresholds only "
        "(tuned; glibc caps the mmap threshold at 32 MiB), or glibc defaults",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run every cell in this process, one after the other (the old order), not in a fresh worker each",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.dims, args.top_k, args.modes = [512], [2], ["fwd+bwd"]
        args.repeats, args.warmup = min(args.repeats, 3), 1
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"machine: {describe_machine(f'{args.malloc} (per cell: backend column)')}")
    print(
        "cells: "
        + ("all in this process, in order" if args.in_process else "each in a fresh spawned worker process")
        + "; expert hidden = 2 * d_model; SwiGLU experts; dense hidden = top_k * expert hidden"
    )
    print(
        f"times: medians of clean samples (other processes under {args.max_foreign:.0%} of the CPUs); "
        "ratios: medians of per-round ratios over rounds clean for both, [min-max] over those rounds; "
        "'clean' = fewest clean samples of any candidate; backend: grouped matmul and malloc setting chosen\n",
        flush=True,
    )
    results = []
    grid = itertools.product(args.tokens, args.dims, args.experts, args.top_k, args.modes)
    for tokens, dim, experts, top_k, mode in grid:
        r = run_cell(
            bench_one,
            tokens,
            dim,
            experts,
            top_k,
            mode,
            args.repeats,
            args.warmup,
            args.loops,
            args.max_foreign,
            args.max_rounds or 3 * args.repeats,
            malloc=args.malloc,
            in_process=args.in_process,
        )
        results.append(r)
        print(_table([r]).splitlines()[-1], flush=True)
    print()
    print(_table(results))
    print(f"\nload average after: {load_average()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
