"""``brickwork slice RUN --width W --depth D``: a nested sub-network of a trained run as a standalone checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from brickwork.errors import BrickworkError
from brickwork.experiment.artifacts import load_trained
from brickwork.experiment.build import load, sliced_spec
from brickwork.experiment.store import RunStore
from brickwork.nn.nested import NestedModel
from brickwork.ops.slice import slice_error, slice_model
from brickwork.train.checkpoint import save_model

HELP = "slice a nested sub-network (width, depth) out of a trained run as a standalone checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run id, id prefix or name")
    parser.add_argument("--width", type=float, required=True, help="width fraction in (0, 1], e.g. 0.5")
    parser.add_argument("--depth", type=int, help="body layers to keep (default: all)")
    parser.add_argument("--model", help="model variant of the run (default: its only one)")
    parser.add_argument("--seed", type=int, help="for runs over several seeds (default: the first)")
    parser.add_argument(
        "--out",
        help="checkpoint to write, e.g. small.safetensors (default: "
        "<run>/<model>/slice-w<W>-d<D>, the width's dot written as p); an existing file is "
        "never overwritten",
    )


def run(args: argparse.Namespace) -> int:
    trained = load_trained(RunStore(args.runs_dir), args.run, args.model, args.seed)
    model = trained.model
    if not isinstance(model, NestedModel):
        raise BrickworkError(
            f"model {trained.label!r} of run {trained.record.id} is {type(model).__name__}, "
            "not a nested model: nothing to slice"
        )
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
    small_spec = sliced_spec(trained.spec, args.width, depth, "slice")
    sliced = slice_model(model, args.width, depth)
    # The probe input: zeros of the data's shape (token id 0 for language models) reach every layer.
    shape = tuple(trained.meta["data"]["in_shape"])
    tokens = any(isinstance(m, nn.Embedding) for m in model.stem.modules())
    x = torch.zeros(2, *shape, dtype=torch.long) if tokens else torch.rand(2, *shape)
    try:
        error = slice_error(model, sliced, x, args.width, depth)
    except RuntimeError as e:
        raise BrickworkError(
            f"depth {depth} leaves a hidden state the head cannot read; this model was trained "
            f"at depths {model.depths} ({str(e).splitlines()[0]})"
        ) from None
    meta = {
        "model": small_spec.to_dict(),
        "data": trained.meta["data"],
        "sliced_from": {"run": trained.record.id, "model": trained.label, "width": args.width, "depth": depth},
        "max_abs_error": error,
    }
    save_model(out, sliced, meta)
    load(out)  # it must load back into a freshly built standalone model
    trained_subnet = (args.width, depth) in model.subnetworks()
    full, small = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in sliced.parameters())
    print(
        f"wrote {out.with_suffix('.safetensors')} (+ .json): width {args.width:g}, depth {depth}/{n}, "
        f"{small:,} of {full:,} parameters; max |sliced - supernet| = {error:.2e}"
    )
    if not trained_subnet:
        print(
            f"note: ({args.width:g}, {depth}) is not one of the sub-networks this model was trained as: "
            f"{model.subnetworks()}"
        )
    return 0
