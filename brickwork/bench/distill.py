"""`brickwork bench distill`: the distillation step against a hand-written KD loop, and the teacher cache's saving.

For each case (a teacher and a student of the fashion-mnist experiment's kind, random inputs of
its shape: time does not depend on the values), this times side by side in one process
(rotating order, warm-up, median of per-round ratios, rounds disturbed by other processes
dropped where possible; ``--clock cpu`` times this process's CPU time instead of the wall clock,
for a machine shared with other work), each candidate doing ``steps`` optimisation steps:

* distill: brickwork's step, ``train.train_step`` on a :class:`~brickwork.train.distill.Distiller`
  (logit KD, live teacher): taps by forward hooks, the weighted term sum, the loop's hooks;
* hand-written: the loop most KD code writes (teacher forward under ``no_grad``, student forward,
  ``alpha * CE + beta * tau^2 * KL``, backward, step), the peer baseline (goal: distill / hand <= 1.05);
* cached: the same distill step with the teacher's logits from a :class:`TeacherCache`;
* teacher: the teacher's forward alone, whose share of the live step is what caching can save.

Headline figures: ``distill / hand-written`` and ``cached / distill`` beside ``1 - teacher share``.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brickwork.analysis.timing import (
    add_clock_option,
    describe_machine,
    load_average,
    named_clock,
    ratio_spread,
    run_cell,
    time_rounds,
)
from brickwork.models import cnn, mlp
from brickwork.train.distill import Distiller, Tap, Term, build_cache, frozen_teacher
from brickwork.train.loop import train_step

TAU, ALPHA, BETA = 4.0, 0.1, 0.9

CASES: dict[str, Callable[[], tuple[nn.Module, nn.Module]]] = {
    "cnn 16-32-64 teacher -> mlp 2x64 student, 28x28, batch 64": lambda: (
        cnn((1, 28, 28), 10, channels=(16, 32, 64)),
        mlp((1, 28, 28), 10, width=64, depth=2),
    ),
    "mlp 3x1024 teacher -> mlp 2x64 student, 28x28, batch 256": lambda: (
        mlp((1, 28, 28), 10, width=1024, depth=3),
        mlp((1, 28, 28), 10, width=64, depth=2),
    ),
}
BATCH = {name: 64 if "batch 64" in name else 256 for name in CASES}


def bench_case(
    name: str, steps: int, repeats: int, max_foreign: float | None, clock: Callable[[], float] = time.perf_counter
) -> dict[str, Any]:
    torch.manual_seed(0)
    teacher, student = CASES[name]()
    teacher = frozen_teacher(teacher)
    b = BATCH[name]
    n = b * steps
    x, y = torch.randn(n, 1, 28, 28), torch.randint(0, 10, (n,))
    rows = torch.arange(n)
    term = {"kd": Term(loss="logit_kd", args={"temperature": TAU, "alpha": ALPHA, "beta": BETA})}
    cache = build_cache(teacher, [Tap()], x)
    live = Distiller(copy.deepcopy(student), teacher, term, y, x[:8])
    cached = Distiller(copy.deepcopy(student), teacher, term, y, x[:8], cache=cache)
    hand = copy.deepcopy(student)
    opts = {
        k: torch.optim.AdamW(m.parameters(), lr=1e-3) for k, m in (("live", live), ("cached", cached), ("hand", hand))
    }
    for m in (live, cached, hand):
        m.train()

    def unused(logits: Tensor, target: Tensor) -> Tensor:
        raise AssertionError("the distiller supplies its own objective")

    def distill_steps(model: Distiller, opt: torch.optim.Optimizer) -> Callable[[], None]:
        def run() -> None:
            for s in range(0, n, b):
                train_step(model, x[s : s + b], rows[s : s + b], unused, opt)

        return run

    def hand_steps() -> None:
        opt = opts["hand"]
        for s in range(0, n, b):
            xb, yb = x[s : s + b], y[s : s + b]
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                t = teacher(xb)
            z = hand(xb)
            kl = F.kl_div(
                F.log_softmax(z / TAU, -1), F.log_softmax(t / TAU, -1), reduction="batchmean", log_target=True
            )
            loss = ALPHA * F.cross_entropy(z, yb) + BETA * TAU**2 * kl
            loss.backward()
            opt.step()

    def teacher_only() -> None:
        with torch.no_grad():
            for s in range(0, n, b):
                teacher(x[s : s + b])

    samples = time_rounds(
        {
            "distill": distill_steps(live, opts["live"]),
            "hand": hand_steps,
            "cached": distill_steps(cached, opts["cached"]),
            "teacher": teacher_only,
        },
        repeats=repeats,
        warmup=1,
        max_foreign=max_foreign,
        clock=clock,
    )
    return {
        "distill_vs_hand": ratio_spread(samples["distill"], samples["hand"], max_foreign),
        "cached_vs_live": ratio_spread(samples["cached"], samples["distill"], max_foreign),
        "teacher_share": ratio_spread(samples["teacher"], samples["distill"], max_foreign).median,
        "distill_ms": 1e3 * samples["distill"].median(max_foreign) / steps,
        "clean": min(len(s.clean(max_foreign)) for s in samples.values()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="brickwork bench distill", description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES), metavar="CASE")
    p.add_argument("--steps", type=int, default=10, help="optimisation steps per timed call")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--max-foreign", type=float, default=0.5, help="drop rounds where other processes used more CPU")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    add_clock_option(p)
    p.add_argument(
        "--in-process", action="store_true", help="all cases in this process (the old order), not a fresh worker each"
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc = "tuned"  # applied in each worker before it allocates
    print(f"machine: {describe_machine(malloc)}")
    clock = named_clock(args.clock)
    print(f"{args.steps} steps per call, median of {args.repeats} interleaved rounds after warm-up, {args.clock} clock")
    print(
        "| case | distill / hand-written KD | cached / live teacher | 1 - teacher share "
        "| distill ms/step | clean rounds |"
    )
    print("|---|---|---|---|---|---|")
    for name in args.cases:
        # the CPU clock already leaves out time other processes took; the contention filter is for the wall clock
        foreign = args.max_foreign if args.clock == "wall" else None
        r = run_cell(
            bench_case,
            name,
            args.steps,
            args.repeats,
            foreign,
            clock,
            in_process=args.in_process,
            malloc_setting=malloc,
        )
        print(
            f"| {name} | {r['distill_vs_hand']} | {r['cached_vs_live']} | {1 - r['teacher_share']:.3f} "
            f"| {r['distill_ms']:.2f} | {r['clean']} |",
            flush=True,
        )
    print(f"load average after: {load_average()}")
    return 0
