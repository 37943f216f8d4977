"""`brickwork bench encode`: encode time of the MoEfied MiniLM against the dense MiniLM.

all-MiniLM-L6-v2 (:func:`brickwork.models.minilm.minilm`, real pretrained weights) and a copy
whose six FFNs are converted into ``--experts`` neuron groups with ``--top-k`` computed per token
(:func:`brickwork.ops.moefy.moefy`, k-means partition and the training-free avg-k gate, so no
calibration training), encoding the same Rotten Tomatoes snippets
(:func:`brickwork.analysis.encoder_bench.study_texts`) in batches of ``--batch`` length-sorted
sentences, as the ``moefy_study`` stage times them. Issue 16's goal: at k / E = 1 / 4, encode time
<= 0.55 of dense (the FLOP limit is about 0.5: the FFNs are two thirds of MiniLM's FLOPs).

Each cell runs in a fresh worker process (:func:`brickwork.analysis.timing.run_cell`); dense and
converted are interleaved after warm-up; printed: the median of per-round ratios with their
min-max spread, the FLOPs ratio beside it, and the grouped-matmul backend chosen. ``--clock cpu``
times this process's CPU time (other processes' time left out; use it with ``--threads 1`` on a
shared machine).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from brickwork.analysis.compute import measure_compute
from brickwork.analysis.encoder_bench import study_texts
from brickwork.analysis.timing import (
    add_clock_option,
    describe_machine,
    load_average,
    named_clock,
    ratio_spread,
    run_cell,
    time_rounds,
)
from brickwork.data.tokenizer import Tokenizer
from brickwork.kernels.autotune import backends_used
from brickwork.models.minilm import encode, minilm
from brickwork.ops.moefy import moefy


def bench_cell(experts: int, top_k: int, sentences: int, batch: int, repeats: int, clock: str) -> dict[str, Any]:
    """Dense against converted MiniLM on ``sentences`` evaluation snippets; one row."""
    torch.manual_seed(0)
    dense = minilm().eval()
    conv, _ = moefy(dense, None, num_experts=experts, top_k=top_k, clustering="kmeans", router="emoe", seed=0)
    conv.eval()
    tok = Tokenizer(128)
    texts = study_texts(0, 0, sentences, 0).sets.texts[:sentences]
    ids = tok(texts[:batch])
    flops = measure_compute(conv, [ids]).total_flops / measure_compute(dense, [ids]).total_flops
    samples = time_rounds(
        {
            "dense": lambda: encode(dense, tok, texts, batch_size=batch),
            "moefy": lambda: encode(conv, tok, texts, batch_size=batch),
        },
        repeats=repeats,
        warmup=1,
        clock=named_clock(clock),
    )
    return {
        "experts": experts,
        "top_k": top_k,
        "dense_s": samples["dense"].median(),
        "moefy_s": samples["moefy"].median(),
        "ratio": ratio_spread(samples["moefy"], samples["dense"]),
        "flops": flops,
        "backend": backends_used("moe", "fwd"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="brickwork bench encode", description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, nargs="+", default=[4], help="experts per token (E: the dense function)")
    p.add_argument("--sentences", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    add_clock_option(p)
    p.add_argument("--in-process", action="store_true", help="every cell in this process, not a fresh worker each")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc = "tuned"
    print(f"machine: {describe_machine(malloc)}")
    print(
        f"{args.sentences} Rotten Tomatoes snippets, batches of {args.batch}, {args.clock} clock, median of "
        f"{args.repeats} interleaved rounds after warm-up; cells: "
        f"{'all in this process' if args.in_process else 'each in a fresh spawned worker'}"
    )
    print("| experts | top-k | dense s | moefy s | moefy / dense [min-max] | FLOPs moefy / dense | backend |")
    print("|---:|---:|---:|---:|---|---:|---|")
    for k in args.top_k:
        r = run_cell(
            bench_cell,
            args.experts,
            k,
            args.sentences,
            args.batch,
            args.repeats,
            args.clock,
            in_process=args.in_process,
            malloc_setting=malloc,
        )
        print(
            f"| {r['experts']} | {r['top_k']} | {r['dense_s']:.3f} | {r['moefy_s']:.3f} | {r['ratio']} "
            f"| {r['flops']:.3f} | {r['backend']} |",
            flush=True,
        )
    print(f"load average after: {load_average()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
