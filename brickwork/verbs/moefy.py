"""``brickwork moefy --experts 16 --top-k 4 --clustering kmeans --router emoe --out DIR``: MiniLM's
FFNs into neuron experts (MoEfication / EMoE), with a report on real text.

The flags become one ``moefy_study`` stage of a run config (:func:`study_config`), run and
recorded like any config (``configs/minilm/moefy-study.yaml`` is the default study), then the
run's results are copied to ``DIR``: ``model.safetensors`` + ``model.json`` (the converted
all-MiniLM-L6-v2, reloadable with :func:`load_converted`), ``report.md`` with ``plots/``, and
``results.json``. The report has: fidelity and cost over E in {8, 16, 32} and top-k from E/8 to
E; clusterings and routers compared; dense vs converted fine-tuning on Rotten Tomatoes over
several seeds; modularity of the co-activation graphs and expert specialisation; layer
importance and the effect of dropping layers. Each part can be switched off.

``--model DIR`` studies a local Hugging Face BERT folder instead of the bundled MiniLM
(:mod:`brickwork.models.bert`: ``config.json``, ``model.safetensors``, ``tokenizer.json``; its
own tokenizer; padding id 0); the run's model is then ``{name: bert, path: DIR}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from torch import nn

from brickwork.errors import BrickworkError
from brickwork.experiment import RunStore, execute, validate
from brickwork.experiment.build import load, read_meta
from brickwork.models.bert import check_bert_folder, encoder_tokenizer, read_bert_config
from brickwork.textio import dumps

__all__ = ["HELP", "add_arguments", "load_converted", "run", "study_config"]

HELP = "split MiniLM's (or --model DIR's) FFNs into experts (MoEfication / EMoE); report fidelity, cost, modularity"
#: MiniLM's FFN width: E must divide it.
FFN_NEURONS = 1536


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", metavar="DIR", help="a local Hugging Face BERT folder (default: the bundled all-MiniLM-L6-v2)"
    )
    parser.add_argument("--experts", type=int, default=16, help="experts per FFN, E (divides the FFN width)")
    parser.add_argument("--top-k", type=int, default=4, help="experts computed per token")
    parser.add_argument(
        "--clustering", choices=["kmeans", "coactivation", "coactivation_spectral", "random"], default="kmeans"
    )
    parser.add_argument("--router", choices=["emoe", "mlp"], default="emoe")
    parser.add_argument("--out", required=True, help="output folder (must not exist)")
    parser.add_argument("--calib-sentences", type=int, default=800, help="Rotten Tomatoes snippets for calibration")
    parser.add_argument("--eval-sentences", type=int, default=1000, help="snippets for probe, fidelity and tests")
    parser.add_argument("--sweep-experts", type=int, nargs="*", default=[8, 16, 32], help="E of the sweep (none: skip)")
    parser.add_argument(
        "--sweep-ratios", type=float, nargs="+", default=[0.125, 0.25, 0.5, 0.75, 1.0], help="top-k / E of the sweep"
    )
    parser.add_argument(
        "--compare-ratios",
        type=float,
        nargs="*",
        default=[0.25, 0.5],
        help="top-k / E at which clusterings and routers are compared (none: skip)",
    )
    parser.add_argument("--finetune-seeds", type=int, default=3, help="0 skips fine-tuning")
    parser.add_argument("--finetune-train", type=int, default=3000, help="fine-tuning training snippets")
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument(
        "--finetune-top-k",
        type=int,
        nargs="+",
        metavar="K",
        help="top-k values at which the converted model is fine-tuned (default: --top-k)",
    )
    parser.add_argument("--no-modularity", action="store_true")
    parser.add_argument("--max-drop", type=int, default=3, help="drop up to this many layers (0: skip importance)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)


def study_config(args: argparse.Namespace) -> dict[str, Any]:
    """The run config the flags stand for: MiniLM (or ``--model``), one ``moefy_study`` stage (see ``validate``)."""
    stage = {
        "stage": "moefy_study",
        "experts": args.experts,
        "top_k": args.top_k,
        "clustering": args.clustering,
        "router": args.router,
        "calib_sentences": args.calib_sentences,
        "eval_sentences": args.eval_sentences,
        "sweep_experts": list(args.sweep_experts),
        "sweep_ratios": list(args.sweep_ratios),
        "compare_ratios": list(args.compare_ratios),
        "finetune_seeds": args.finetune_seeds,
        "finetune_train": args.finetune_train,
        "finetune_epochs": args.finetune_epochs,
        "finetune_top_k": args.finetune_top_k,
        "modularity": not args.no_modularity,
        "max_drop": args.max_drop,
        "seed": args.seed,
    }
    folder = getattr(args, "model", None)
    return {
        "name": "moefy-minilm-study" if folder is None else "moefy-bert-study",
        "seed": args.seed,
        "threads": args.threads,
        "data": {"name": "rotten-tomatoes"},
        "model": {"name": "minilm-l6"} if folder is None else {"name": "bert", "path": str(Path(folder).resolve())},
        "stages": [stage],
    }


def load_converted(stem: str | Path) -> nn.Module:
    """A model written by ``brickwork moefy``, rebuilt and loaded (weights checked by hash), in eval mode.

    Files of earlier versions (``model.json`` with ``"model": "minilm-l6"`` and a ``moefy`` section
    instead of a spec and a recipe) are read too.
    """
    meta = read_meta(stem)
    if isinstance(meta.get("model"), str):
        mf = meta["moefy"]
        meta = {
            **meta,
            "model": {"name": meta["model"]},
            "data": {"in_shape": [128], "num_classes": 2},
            "structure": [{"op": "moefy", "experts": mf["experts"], "top_k": mf["top_k"], "router": mf["router"]}],
        }
    return load(stem, meta).model.eval()


def _check(args: argparse.Namespace) -> None:
    neurons, whose = FFN_NEURONS, "MiniLM's"
    if args.model is not None:
        neurons, whose = read_bert_config(check_bert_folder(args.model)).hidden, f"{args.model}'s"
        encoder_tokenizer("bert", {"path": args.model}, 8, where="--model")  # refuses what the study cannot read
    if args.experts < 1 or neurons % args.experts:
        raise BrickworkError(f"--experts must divide {whose} {neurons} FFN neurons, got {args.experts}")
    if not 1 <= args.top_k <= args.experts:
        raise BrickworkError(f"--top-k must be in 1..{args.experts}, got {args.top_k}")
    bad_k = [k for k in args.finetune_top_k or [] if not 1 <= k <= args.experts]
    if bad_k:
        raise BrickworkError(f"--finetune-top-k must be in 1..{args.experts}, got {bad_k}")
    bad = [e for e in args.sweep_experts if e < 1 or neurons % e]
    if bad:
        raise BrickworkError(f"--sweep-experts must divide {neurons}, got {bad}")


def _place(src: Path, dst: Path) -> None:
    """``dst`` with ``src``'s content: a hard link where the file system allows (the model is 90 MB)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists():
        raise BrickworkError(f"{out} exists; choose another --out (brickwork never overwrites a folder)")
    _check(args)
    cfg = validate(study_config(args))  # bad flags fail here, before a run exists
    t0 = time.perf_counter()
    # Raises DataError (one line, exit 2) when MiniLM or the data sets are missing.
    rec = execute(cfg, RunStore(args.runs_dir), progress=False)
    vdir = rec.dir / next(iter(cfg.models))
    parts = json.loads((vdir / "stage0-results.json").read_text())
    out.mkdir(parents=True)
    for suffix in (".safetensors", ".json"):
        _place(vdir.joinpath("model").with_suffix(suffix), out.joinpath("model").with_suffix(suffix))
    if (rec.dir / "plots").is_dir():
        shutil.copytree(rec.dir / "plots", out / "plots")
    shutil.copy2(rec.dir / "report.md", out / "report.md")
    results: dict[str, Any] = {
        "args": {k: v for k, v in vars(args).items() if k not in ("verb_module", "func")},
        "run": rec.id,
        **parts,
        "seconds": time.perf_counter() - t0,
    }
    (out / "results.json").write_text(dumps(results, "results", indent=2) + "\n")
    m = results["main"]
    print(
        f"wrote {out / 'model.safetensors'} (+ .json): {m['label']}, fidelity {m['fidelity']:.4f}, "
        f"FFN FLOPs x{m['ffn_ratio']:.3f} of dense"
    )
    print(f"report: {out / 'report.md'} ({results['seconds'] / 60:.1f} min)")
    return 0
