"""``brickwork slice RUN --width W --depth D``: a nested sub-network of a trained run as a standalone checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from brickwork.errors import BrickworkError, CheckpointError
from brickwork.experiment.artifacts import load_trained
from brickwork.experiment.config import Spec, validate_args
from brickwork.experiment.pipeline import build_model
from brickwork.experiment.rebuild import apply_structure
from brickwork.experiment.store import RunStore
from brickwork.models.nested import sliced_args
from brickwork.nn.nested import NestedModel
from brickwork.ops.slice import slice_error, slice_model
from brickwork.persist import read_json
from brickwork.registry import REGISTRY
from brickwork.train.checkpoint import load_model, save_model

HELP = "slice a nested sub-network (width, depth) out of a trained run as a standalone checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run id, id prefix or name")
    parser.add_argument("--width", type=float, required=True, help="width fraction in (0, 1], e.g. 0.5")
    parser.add_argument("--depth", type=int, help="body layers to keep (default: all)")
    parser.add_argument("--model", help="model variant of the run (default: its only one)")
    parser.add_argument("--seed", type=int, help="for runs over several seeds (default: the first)")
    parser.add_argument("--out", help="checkpoint to write, e.g. small.safetensors (default: "
                        "<run>/<model>/slice-w<W>-d<D>, the width's dot written as p); an existing file is "
                        "never overwritten")


def load_checkpoint_model(stem: str | Path) -> nn.Module:
    """Rebuild the model a checkpoint's metadata names (``model`` spec, ``data`` shapes), load its weights.

    Raises:
        CheckpointError: the metadata or weights are missing or do not match.
    """
    stem = Path(stem)
    try:
        meta = read_json(stem.with_suffix(".json"))
        raw, data = dict(meta["model"]), meta["data"]
    except (OSError, KeyError, ValueError) as e:
        raise CheckpointError(f"{stem}: no readable model metadata ({e})") from None
    entry = REGISTRY.get("model", raw.pop("name"))
    model = build_model(Spec("model", entry.name, validate_args(entry, raw, "model")),
                        tuple(data["in_shape"]), data["num_classes"])
    model = apply_structure(model, meta.get("structure", []))
    load_model(stem, model)
    return model


def run(args: argparse.Namespace) -> int:
    trained = load_trained(RunStore(args.runs_dir), args.run, args.model, args.seed)
    model = trained.model
    if not isinstance(model, NestedModel):
        raise BrickworkError(f"model {trained.label!r} of run {trained.record.id} is {type(model).__name__}, "
                             "not a nested model: nothing to slice")
    n = len(model.body)
    depth = n if args.depth is None else args.depth
    if not 0 < args.width <= 1:
        raise BrickworkError(f"--width must be a fraction in (0, 1], got {args.width}")
    if not 1 <= depth <= n:
        raise BrickworkError(f"--depth must be in 1..{n}, got {depth}")
    # No dot in the default name: checkpoint stems get their suffixes by Path.with_suffix.
    out = Path(args.out) if args.out else trained.dir / f"slice-w{args.width:g}-d{depth}".replace(".", "p")
    out = out.with_suffix("") if out.suffix in (".safetensors", ".json") else out
    if "." in out.name:
        raise BrickworkError(f"--out {args.out}: give a file name without dots (it gets .safetensors and .json)")
    for f in (out.with_suffix(".safetensors"), out.with_suffix(".json")):
        if f.exists():
            raise BrickworkError(f"{f} exists; choose another --out (brickwork never overwrites a file)")
    args_small = validate_args(trained.spec.entry, sliced_args(trained.spec.name, trained.spec.args, args.width, depth),
                               "slice")
    sliced = slice_model(model, args.width, depth)
    # The probe input: zeros of the data's shape (token id 0 for language models) reach every layer.
    shape = tuple(trained.meta["data"]["in_shape"])
    tokens = any(isinstance(m, nn.Embedding) for m in model.stem.modules())
    x = torch.zeros(2, *shape, dtype=torch.long) if tokens else torch.rand(2, *shape)
    try:
        error = slice_error(model, sliced, x, args.width, depth)
    except RuntimeError as e:
        raise BrickworkError(f"depth {depth} leaves a hidden state the head cannot read; this model was trained "
                             f"at depths {model.depths} ({str(e).splitlines()[0]})") from None
    meta = {"model": {"name": trained.spec.name, **args_small}, "data": trained.meta["data"],
            "sliced_from": {"run": trained.record.id, "model": trained.label, "width": args.width, "depth": depth},
            "max_abs_error": error}
    save_model(out, sliced, meta)
    load_checkpoint_model(out)  # it must load back into a freshly built standalone model
    trained_subnet = (args.width, depth) in model.subnetworks()
    full, small = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in sliced.parameters())
    print(f"wrote {out.with_suffix('.safetensors')} (+ .json): width {args.width:g}, depth {depth}/{n}, "
          f"{small:,} of {full:,} parameters; max |sliced - supernet| = {error:.2e}")
    if not trained_subnet:
        print(f"note: ({args.width:g}, {depth}) is not one of the sub-networks this model was trained as: "
              f"{model.subnetworks()}")
    return 0
