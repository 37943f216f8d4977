"""DDP options and gloo settings for one data-parallel step, each paired with brickwork's DDP step.

An exploration behind docs/scaling.md "Cutting the step's collectives" (not a shipped bench): in 2
gloo ranks (``brickwork.distributed.run_ranks``), one AdamW ``train_step`` on the global batch of
a ``bench distributed`` case, timed in rotating rounds (``analysis.timing.time_rounds``) for:

* ``dp``: brickwork's DDP step (scalars fused into the last gradient bucket);
* ``apart``: the same with the scalars' own all-reduce (``fuse_scalars=False``);
* ``view`` / ``static`` / ``nosearch`` / ``buckets``: DDP with ``gradient_as_bucket_view``,
  ``static_graph`` (unused search off), the unused search off, ``bucket_cap_mb=0.25`` (the fused
  scalars kept in each);
* ``ideal+16B``: the plain step on the rank's B/2 rows, then a 16-byte all-reduce (it waits for the
  slower rank, as a data-parallel step does; every candidate ends in a collective, so the ranks
  stay in step).

Printed: each candidate's median ms (slowest rank) and its paired ratio to ``dp``. Environment:
``H6_PIN=1`` pins rank r to core r, ``H6_INTEROP=1`` sets ``torch.set_num_interop_threads(1)`` in
the ranks; ``GLOO_SOCKET_IFNAME`` is read by gloo itself.

    PYTHONPATH=$PWD .venv/bin/python tools/ddp_options.py mlp 30 [global batch]
"""

from __future__ import annotations

import copy
import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from brickwork.analysis.timing import load_average, paired_ratio, time_rounds
from brickwork.bench.distributed import CASES, LOSS, _setup
from brickwork.data import load_dataset
from brickwork.distributed import DistContext, run_ranks, shard_batch
from brickwork.distributed.data_parallel import DataParallel
from brickwork.distributed.fused_scalars import ScalarRider
from brickwork.train import train_step


def _variant(model: torch.nn.Module, ctx: DistContext, **options: Any) -> DataParallel:
    """brickwork's DDP wrapper whose engine is DDP built with ``options`` (and the fused scalars)."""
    dp = DataParallel(copy.deepcopy(model), ctx, "ddp")
    engine = DistributedDataParallel(dp.objective, process_group=ctx.group, **options)
    dp.rider = ScalarRider(ctx.group, ctx.world_size)
    engine.register_comm_hook(None, dp.rider.hook)  # type: ignore[arg-type]
    object.__setattr__(dp, "engine", engine)
    return dp


def _rank(ctx: DistContext, case: str, x: Tensor, y: Tensor, repeats: int) -> dict[str, tuple[float, float]]:
    if os.environ.get("H6_INTEROP"):
        torch.set_num_interop_threads(int(os.environ["H6_INTEROP"]))
    if os.environ.get("H6_PIN"):
        os.sched_setaffinity(0, {ctx.rank % (os.cpu_count() or 1)})
    alone, _ = _setup(case, x, y)
    xr, yr, _ = shard_batch(ctx, x, y)
    engines = {
        "dp": DataParallel(copy.deepcopy(alone), ctx, "ddp"),
        "apart": DataParallel(copy.deepcopy(alone), ctx, "ddp", fuse_scalars=False),
        "view": _variant(alone, ctx, find_unused_parameters=True, gradient_as_bucket_view=True),
        "static": _variant(alone, ctx, find_unused_parameters=False, static_graph=True),
        "nosearch": _variant(alone, ctx, find_unused_parameters=False),
        "buckets": _variant(alone, ctx, find_unused_parameters=True, bucket_cap_mb=0.25),
    }
    steps = {}
    for name, engine in engines.items():
        opt = torch.optim.AdamW(engine.parameters(), lr=1e-3)
        steps[name] = lambda e=engine, o=opt: train_step(e, x, y, LOSS, o)
    opt_alone = torch.optim.AdamW(alone.parameters(), lr=1e-3)
    tick = torch.zeros(2, dtype=torch.float64)

    def ideal_synced() -> None:
        train_step(alone, xr, yr, LOSS, opt_alone)
        dist.all_reduce(tick, group=ctx.group)

    steps["ideal+16B"] = ideal_synced
    s = time_rounds(steps, repeats=repeats, warmup=3)
    return {k: (v.median(), paired_ratio(v, s["dp"])) for k, v in s.items()}


def main(argv: list[str]) -> None:
    case, repeats = argv[0], int(argv[1])
    _, _, data, data_args, batch = CASES[case]
    batch = int(argv[2]) if len(argv) > 2 else batch
    ds = load_dataset(data, seed=0, **data_args)
    rows = torch.arange(batch) % len(ds.train.x)
    env = {k: v for k, v in os.environ.items() if k.startswith(("H6_", "GLOO_"))}
    print(f"load {load_average()}; case {case}, global batch {batch}, {env}")
    res = run_ranks(_rank, 2, case, ds.train.x[rows], ds.train.y[rows], repeats, timeout_s=900.0)
    for k in res[0]:
        print(f"{k:10s} {1e3 * max(r[k][0] for r in res):8.2f} ms   / dp {max(r[k][1] for r in res):.3f}")
    print(f"load after {load_average()}")


if __name__ == "__main__":
    main(sys.argv[1:])
