"""``brickwork merge INPUT... --method M --out DIR``: merge runs, checkpoints or files into a new checkpoint.

Each INPUT is a run (id, id prefix or name; ``RUN:LABEL`` picks a model variant, ``--seed`` a
seed), a brickwork checkpoint (its stem, ``.safetensors`` or ``.json`` path, or a folder holding
``model.safetensors``), or a plain ``.safetensors`` file. The merge streams tensor by tensor
from the files (:func:`brickwork.ops.merge_files.merge_files`: memory does not grow with the
number of inputs) and writes ``DIR/model.safetensors`` + ``DIR/model.json`` with the method, its
options and every input's SHA-256. ``DIR`` must not exist: brickwork never overwrites.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from brickwork.errors import BrickworkError
from brickwork.experiment.artifacts import load_trained
from brickwork.experiment.build import load
from brickwork.experiment.store import RunStore
from brickwork.experiment.yaml_io import safe_load
from brickwork.ops.merge import METHODS
from brickwork.ops.merge_files import merge_files
from brickwork.persist import read_json

HELP = "merge runs, checkpoints or safetensors files (same architecture) into a new checkpoint folder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="runs (RUN or RUN:MODEL), checkpoint stems or folders, .safetensors")
    parser.add_argument("--method", default="linear", choices=METHODS, help="merge method (default: linear)")
    parser.add_argument("--out", required=True, help="checkpoint folder to create; it must not exist")
    parser.add_argument("--base", help="base model for task arithmetic, TIES, DARE, Model Stock (same forms)")
    parser.add_argument("--weights", type=float, nargs="+", help="one weight per input, in order")
    parser.add_argument(
        "--statistics", nargs="+", help="fisher / regmean: one safetensors file of statistics per input"
    )
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a method option (density=0.2, scale=0.5, t=0.3, ties=mergekit, ...); repeatable",
    )
    parser.add_argument("--seed", type=int, help="for runs over several seeds (default: the first)")


def _parse_option(item: str) -> tuple[str, Any]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise BrickworkError(f"--option {item!r}: expected KEY=VALUE, e.g. density=0.2")
    return key.strip(), safe_load(value)


def resolve_input(ref: str, runs_dir: str | Path, seed: int | None = None) -> Path:
    """The ``.safetensors`` file of one INPUT: a file, a checkpoint stem or folder, or a run (``RUN[:MODEL]``).

    Raises:
        BrickworkError: no file, checkpoint or run of that name.
    """
    p = Path(ref)
    if p.suffix in (".safetensors", ".json") and p.with_suffix(".safetensors").is_file():
        return p.with_suffix(".safetensors")
    if p.with_name(p.name + ".safetensors").is_file():
        return p.with_name(p.name + ".safetensors")
    if p.is_dir() and (p / "model.safetensors").is_file():
        return p / "model.safetensors"
    if p.suffix in (".safetensors", ".json") or p.exists():
        raise BrickworkError(f"{ref}: not a safetensors file, checkpoint stem or folder holding model.safetensors")
    run, _, label = ref.partition(":")
    try:
        trained = load_trained(RunStore(runs_dir), run, label or None, seed)
    except BrickworkError as e:
        raise BrickworkError(f"{ref}: neither a file nor a run's model ({e})") from None
    return trained.dir / "model.safetensors"


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists():
        raise BrickworkError(f"--out {out} exists; choose a new folder (brickwork never overwrites)")
    if len(args.inputs) < 2 and args.base is None:
        raise BrickworkError("merge: give at least two inputs (or one and --base)")
    if args.weights is not None and len(args.weights) != len(args.inputs):
        raise BrickworkError(f"--weights has {len(args.weights)} values for {len(args.inputs)} inputs; give one each")
    options = dict(_parse_option(o) for o in args.option)
    if args.weights is not None:
        options["weights"] = args.weights
    paths = [resolve_input(ref, args.runs_dir, args.seed) for ref in args.inputs]
    base = resolve_input(args.base, args.runs_dir, args.seed) if args.base else None
    out.mkdir(parents=True)
    try:
        written = merge_files(paths, out / "model", args.method, base=base, statistics=args.statistics, **options)
    except BaseException:
        shutil.rmtree(out)  # the folder this command created; nothing else is touched
        raise
    loadable = ""
    first_meta = paths[0].with_suffix(".json")
    if first_meta.is_file() and "model" in read_json(first_meta):
        ckpt = load(out / "model")  # a brickwork model must load back into a freshly built one
        loadable = f"; loads as {type(ckpt.model).__name__}"
    print(f"wrote {written} (+ model.json): {args.method} of {len(paths)} inputs{loadable}")
    return 0
