"""`brickwork bench expert-parallel`: the expert-parallel MoE against the local MoE, and what the exchanges cost.

On P local gloo ranks (one thread each, :func:`brickwork.distributed.run_ranks`), every rank
holds ``tokens`` tokens and times, interleaved after warm-up (median of repeats,
:func:`brickwork.analysis.timing.time_rounds`), one forward+backward of:

* ``local``: the single-process :func:`brickwork.nn.moe.moe_ffn` with all E experts on the
  rank's tokens (what each rank runs under plain data parallelism);
* ``ep``: :class:`brickwork.distributed.expert_parallel.ExpertParallelMoE` with ``E / P``
  experts per rank on the same tokens (same weights, same routing: the same FLOPs when loads
  are balanced), plus the exchanges and the global-batch auxiliary losses;
* ``exchange``: the dispatch and combine exchanges alone (counts, then tokens; backward through
  both) with the rows and splits ``ep`` sends, identity experts.

Printed: ``ep / local`` (the goal is <= 1.3 at 2 ranks), the exchange's share of the ``ep``
step, the bytes each rank sends to other ranks per step, the load imbalance (max over ranks of
the rows an expert rank computes / the mean), and the two constants of the cost model of
``docs/scaling.md`` fitted on these rows: the ranks' grouped-FFN throughput and the exchange's
fixed cost and bandwidth. Gradient synchronisation is left out of both steps (data parallelism
would all-reduce every expert's gradient, expert parallelism none of them across the EP group).
A rank's times are its own; a figure is the slowest rank's. With P ranks on P cores the other
ranks are always busy, so the contention filter of the other benches cannot be used here.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from brickwork.analysis.timing import describe_machine, load_average, paired_ratio, run_cell, time_rounds
from brickwork.distributed import DistContext, run_ranks
from brickwork.distributed.expert_dispatch import combine, dispatch
from brickwork.distributed.expert_parallel import ExpertParallelGroups, ExpertParallelMoE
from brickwork.nn import collect_aux_losses
from brickwork.nn.moe import moe_ffn
from brickwork.nn.routing import MoESettings, plan_dispatch


def _step(module: nn.Module, x: Tensor, grad: Tensor) -> Callable[[], None]:
    def run() -> None:
        module.zero_grad(set_to_none=True)
        y = module(x)
        loss = (y * grad).sum() + sum(collect_aux_losses(module).values(), torch.zeros(()))
        loss.backward()

    return run


def _exchange(rows: Tensor, counts: Tensor, group: Any) -> Callable[[], None]:
    def run() -> None:
        r = rows.detach().requires_grad_(True)
        local, ex = dispatch(r, counts, group)
        combine(local, ex).sum().backward()

    return run


def _rank(ctx: DistContext, tokens: int, dim: int, experts: int, top_k: int, repeats: int, warmup: int) -> dict:
    groups = ExpertParallelGroups.from_mesh(ctx.mesh((ctx.world_size,), ("ep",)))
    torch.manual_seed(0)  # the same weights on every rank
    moe = moe_ffn(dim, 2 * dim, experts, routing=MoESettings(top_k=top_k), act="silu", glu=True)
    ep = ExpertParallelMoE.from_moe(moe, groups)
    g = torch.Generator().manual_seed(1 + ctx.rank)  # each rank its own tokens
    x = torch.randn(tokens, dim, generator=g)
    grad = torch.randn(tokens, dim, generator=g)
    with torch.no_grad():
        plan = plan_dispatch(moe.router(x))
    rows = x.index_select(0, plan.token_idx)
    per_rank = plan.counts.view(ctx.world_size, -1).sum(1)
    sent = int(per_rank.sum() - per_rank[groups.ep_rank])  # rows that leave this rank
    everyone = per_rank.clone()
    torch.distributed.all_reduce(everyone)  # rows each EP rank computes
    candidates = {
        "local": _step(moe, x, grad),
        "ep": _step(ep, x, grad),
        "exchange": _exchange(rows, plan.counts, groups.ep),
    }
    samples = time_rounds(candidates, repeats=repeats, warmup=warmup)
    return {
        "median": {n: s.median() for n, s in samples.items()},
        "ratio": paired_ratio(samples["ep"], samples["local"]),
        "share": paired_ratio(samples["exchange"], samples["ep"]),
        "sent_bytes": 4 * sent * dim * x.element_size(),  # dispatch + combine, forward and backward
        "rows": int(plan.counts.sum()),
        "imbalance": float(everyone.max() / everyone.double().mean()),
    }


def bench_one(ranks: int, tokens: int, dim: int, experts: int, top_k: int, repeats: int, warmup: int) -> dict:
    """One configuration on ``ranks`` local processes: the slowest rank's figures."""
    got = run_ranks(
        _rank, ranks, tokens, dim, experts, top_k, repeats, warmup, timeout_s=1800, collective_timeout_s=600
    )
    worst = {n: max(r["median"][n] for r in got) for n in ("local", "ep", "exchange")}
    # FLOPs of the grouped SwiGLU experts per rank, forward + backward: 3 x (2 D 2H + 2 H D) per row.
    hidden = 2 * dim
    flops = 3 * 6 * dim * hidden * max(r["rows"] for r in got)
    return {
        "ranks": ranks, "tokens": tokens, "dim": dim, "experts": experts, "top_k": top_k, **worst,
        "ratio": max(r["ratio"] for r in got), "share": max(r["share"] for r in got),
        "sent_bytes": max(r["sent_bytes"] for r in got), "imbalance": got[0]["imbalance"],
        "gflops": flops / worst["local"] / 1e9,
    }  # fmt: skip


def fit_exchange(results: list[dict]) -> tuple[float, float]:
    """Least-squares ``t_exchange = a + bytes / bandwidth`` over the rows: (a seconds, bandwidth bytes/s)."""
    if len(results) < 2:
        r = results[0]
        return 0.0, r["sent_bytes"] / r["exchange"]
    b = torch.tensor([r["sent_bytes"] for r in results], dtype=torch.float64)
    t = torch.tensor([r["exchange"] for r in results], dtype=torch.float64)
    design = torch.stack([torch.ones_like(b), b], 1)
    a, inv_bw = torch.linalg.lstsq(design, t[:, None]).solution.reshape(-1).tolist()
    return max(a, 0.0), 1.0 / inv_bw if inv_bw > 0 else float("inf")


def predict_tokens_per_s(
    tokens: int, dim: int, top_k: int, ranks: int, gflops: float, fixed_s: float, bandwidth: float,
    imbalance: float = 1.0, bytes_per_value: int = 4,
) -> float:  # fmt: skip
    """The cost model of ``docs/scaling.md``: tokens per second per rank of an expert-parallel FFN step.

    ``t = imbalance * 18 D H k N / F + a + 4 k N D b (P - 1) / P / bandwidth``, H = 2D: the
    grouped experts' forward+backward FLOPs at throughput F, then the four exchanges (dispatch and
    combine, forward and backward) of the rows that leave the rank, uniform routing assumed.
    """
    rows = top_k * tokens
    compute = imbalance * 18 * dim * (2 * dim) * rows / (gflops * 1e9)
    sent = 4 * rows * dim * bytes_per_value * (ranks - 1) / ranks
    return tokens / (compute + fixed_s + sent / bandwidth)


def _table(results: list[dict]) -> str:
    lines = [
        "| ranks | tokens/rank | d_model | experts | top-k | local ms | ep ms | exchange ms | ep / local "
        "| exchange share | MB sent/rank | imbalance | GFLOP/s/rank |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['ranks']} | {r['tokens']} | {r['dim']} | {r['experts']} | {r['top_k']} | {1e3 * r['local']:.1f} | "
            f"{1e3 * r['ep']:.1f} | {1e3 * r['exchange']:.1f} | {r['ratio']:.2f} | {r['share']:.0%} | "
            f"{r['sent_bytes'] / 1e6:.1f} | {r['imbalance']:.2f} | {r['gflops']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a markdown table and the fitted cost model; returns the exit status."""
    parser = argparse.ArgumentParser(prog="brickwork bench expert-parallel", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096], help="tokens per rank")
    parser.add_argument("--dims", type=int, nargs="+", default=[256])
    parser.add_argument("--experts", type=int, nargs="+", default=[8])
    parser.add_argument("--top-k", type=int, nargs="+", default=[2])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="2 ranks, 512 and 2048 tokens, d_model 128, 3 repeats")
    parser.add_argument(
        "--in-process", action="store_true", help="all cells from this process (the old order), not a fresh worker each"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.ranks, args.tokens, args.dims, args.repeats, args.warmup = [2], [512, 2048], [128], 3, 1
    torch.set_num_threads(1)
    print(f"machine: {describe_machine()}; each rank 1 thread")
    print(f"cells: {'all from this process' if args.in_process else 'each from a fresh spawned worker'}")
    print("fp32; SwiGLU experts, expert hidden = 2 * d_model; top-k softmax router with the Switch loss; fwd+bwd\n")
    results = []
    for ranks, tokens, dim, experts, top_k in itertools.product(
        args.ranks, args.tokens, args.dims, args.experts, args.top_k
    ):
        r = run_cell(
            bench_one, ranks, tokens, dim, experts, top_k, args.repeats, args.warmup, in_process=args.in_process
        )
        results.append(r)
        print(_table([r]).splitlines()[-1], flush=True)
    print()
    print(_table(results))
    fixed, bandwidth = fit_exchange(results)
    print(
        f"\ncost model (docs/scaling.md): exchange a = {1e3 * fixed:.2f} ms + bytes / {bandwidth / 1e9:.3f} GB/s "
        f"(fit over {len(results)} rows); F = each row's GFLOP/s/rank (its local step)"
    )
    for r in results:
        pred = predict_tokens_per_s(
            r["tokens"], r["dim"], r["top_k"], r["ranks"], r["gflops"], fixed, bandwidth, r["imbalance"]
        )
        print(
            f"  {r['ranks']} ranks x {r['tokens']} tokens: predicted {pred:,.0f} tokens/s/rank, "
            f"measured {r['tokens'] / r['ep']:,.0f}"
        )
    print(f"\nload average after: {load_average()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
