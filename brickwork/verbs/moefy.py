"""``brickwork moefy --experts 16 --top-k 4 --clustering kmeans --router emoe --out DIR``: MiniLM's
FFNs into neuron experts (MoEfication / EMoE), with a report on real text.

Writes ``DIR/model.safetensors`` + ``DIR/model.json`` (the converted all-MiniLM-L6-v2, reloadable
with :func:`load_converted`), ``DIR/report.md`` with plots, and ``DIR/results.json``. The report
has: fidelity and cost over E in {8, 16, 32} and top-k from E/8 to E; clusterings and routers
compared; dense vs converted fine-tuning on Rotten Tomatoes over several seeds; modularity of
the co-activation graphs and expert specialisation; layer importance and the effect of dropping
layers. Each part can be switched off. Rotten Tomatoes snippets are split once (seed 0) into
calibration, evaluation and fine-tuning-training sentences, disjoint.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from brickwork.errors import BrickworkError
from brickwork.experiment.moefy_study import Study, load_converted

__all__ = ["HELP", "add_arguments", "load_converted", "run"]

HELP = "split MiniLM's FFNs into experts (MoEfication / EMoE) and report fidelity, cost, fine-tuning, modularity"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experts", type=int, default=16, help="experts per FFN, E (divides 1536)")
    parser.add_argument("--top-k", type=int, default=4, help="experts computed per token")
    parser.add_argument("--clustering", choices=["kmeans", "coactivation", "random"], default="kmeans")
    parser.add_argument("--router", choices=["emoe", "mlp"], default="emoe")
    parser.add_argument("--out", required=True, help="output folder (must not exist)")
    parser.add_argument("--calib-sentences", type=int, default=800, help="Rotten Tomatoes snippets for calibration")
    parser.add_argument("--eval-sentences", type=int, default=1000, help="snippets for probe, fidelity and tests")
    parser.add_argument("--sweep-experts", type=int, nargs="*", default=[8, 16, 32], help="E of the sweep (none: skip)")
    parser.add_argument("--sweep-ratios", type=float, nargs="+", default=[0.125, 0.25, 0.5, 0.75, 1.0],
                        help="top-k / E of the sweep")
    parser.add_argument("--compare-ratios", type=float, nargs="*", default=[0.25, 0.5],
                        help="top-k / E at which clusterings and routers are compared (none: skip)")
    parser.add_argument("--finetune-seeds", type=int, default=3, help="0 skips fine-tuning")
    parser.add_argument("--finetune-train", type=int, default=3000, help="fine-tuning training snippets")
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--finetune-top-k", type=int, nargs="+", metavar="K",
                        help="top-k values at which the converted model is fine-tuned (default: --top-k)")
    parser.add_argument("--no-modularity", action="store_true")
    parser.add_argument("--max-drop", type=int, default=3, help="drop up to this many layers (0: skip importance)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists():
        raise BrickworkError(f"{out} exists; choose another --out (brickwork never overwrites a folder)")
    if args.experts < 1 or 1536 % args.experts:
        raise BrickworkError(f"--experts must divide MiniLM's 1536 FFN neurons, got {args.experts}")
    if not 1 <= args.top_k <= args.experts:
        raise BrickworkError(f"--top-k must be in 1..{args.experts}, got {args.top_k}")
    bad_k = [k for k in args.finetune_top_k or [] if not 1 <= k <= args.experts]
    if bad_k:
        raise BrickworkError(f"--finetune-top-k must be in 1..{args.experts}, got {bad_k}")
    bad = [e for e in args.sweep_experts if e < 1 or 1536 % e]
    if bad:
        raise BrickworkError(f"--sweep-experts must divide 1536, got {bad}")
    if args.threads:
        torch.set_num_threads(args.threads)
    study = Study.load(args)  # raises DataError (one line, exit 2) when MiniLM or the data sets are missing
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    results: dict[str, Any] = {"args": {k: v for k, v in vars(args).items() if k not in ("verb_module", "func")}}
    results["main"] = study.convert_and_save(out)
    print(f"wrote {out / 'model.safetensors'} (+ .json): {results['main']['label']}, fidelity "
          f"{results['main']['fidelity']:.4f}, FFN FLOPs x{results['main']['ffn_ratio']:.3f} of dense")
    if args.sweep_experts:
        results["sweep"] = study.sweep(args.sweep_experts, args.sweep_ratios)
    if args.compare_ratios:
        results["compare"] = study.compare(args.compare_ratios)
    results["timing"] = study.timing()
    if args.finetune_seeds:
        results["finetune"] = study.finetune(args.finetune_seeds, args.finetune_train, args.finetune_epochs,
                                             args.finetune_top_k or [args.top_k])
    if not args.no_modularity:
        results["modularity"] = study.modularity(out)
    if args.max_drop:
        results["importance"] = study.importance(args.max_drop)
    results["seconds"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    (out / "report.md").write_text(study.report(results, out))
    print(f"report: {out / 'report.md'} ({results['seconds'] / 60:.1f} min)")
    return 0
