"""``brickwork grow SOURCE --op OP ...``: one function-preserving growth step on a trained model.

SOURCE is a run (id, id prefix or name; ``--model``/``--seed`` pick a variant) or a checkpoint
stem (``path/model`` with ``.safetensors`` + ``.json`` beside it). The grown model is written as
a new checkpoint whose metadata carries the growth recipe, so it loads back (``experiment.build``
replays the recipe); the largest change of the outputs on a probe batch is printed beside it.
``brickwork upcycle`` (``verbs/upcycle.py``) shares the loading and writing here.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import pydantic
import torch
from torch import nn

from brickwork.errors import BrickworkError, ConfigError
from brickwork.experiment.artifacts import load_trained
from brickwork.experiment.build import load
from brickwork.experiment.store import RunStore
from brickwork.nn.modes import evaluating
from brickwork.ops.grow import GrowSettings, apply_grow
from brickwork.train.checkpoint import save_model

HELP = "grow a trained model by one function-preserving step (deepen, widen, heads, experts)"


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments naming what to grow and where to write it (shared with ``upcycle``)."""
    parser.add_argument("source", help="run id, id prefix or name, or a checkpoint stem (path without suffix)")
    parser.add_argument("--model", help="model variant of the run (default: its only one)")
    parser.add_argument("--seed", type=int, help="for runs over several seeds (default: the first)")
    parser.add_argument(
        "--out", help="checkpoint stem to write (default: <variant folder>/<op>); an existing file is never overwritten"
    )


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_source_arguments(parser)
    parser.add_argument(
        "--op",
        required=True,
        help="deepen, widen_layers, widen_ffn, widen_residual, add_heads, add_experts, split_expert",
    )
    for name, kind, what in (
        ("position", int, "deepen: index the new body layer takes"),
        ("like", int, "deepen: body layer to copy"),
        ("block", str, "deepen: copy or residual_ffn"),
        ("hidden", int, "widen_ffn: new FFN width; deepen residual_ffn: its width"),
        ("width", int, "widen_layers: new width"),
        ("positions", _ints, "widen_layers: representations, e.g. 0,1"),
        ("layers", _ints, "body layers, e.g. 0,2"),
        ("factor", int, "widen_residual: copies of every stream dimension"),
        ("heads", int, "add_heads: new head count"),
        ("count", int, "add_experts: experts to add per layer"),
        ("logit", float, "add_experts unchosen: router bias of new experts"),
        ("layer", int, "split_expert: body layer"),
        ("expert", int, "split_expert: expert index"),
        ("mode", str, "split/zero (widths, heads) or unchosen/copy (experts)"),
    ):
        parser.add_argument(f"--{name}", type=kind, help=what)
    parser.add_argument("--grow-seed", type=int, default=0, help="the Net2Net map and new weights (default 0)")


def load_source(args: argparse.Namespace) -> tuple[nn.Module, dict[str, Any], Path]:
    """The model to grow, its checkpoint metadata, and its folder."""
    stem = Path(args.source)
    stem = stem.with_suffix("") if stem.suffix in (".safetensors", ".json") else stem
    if stem.with_suffix(".json").exists():
        ckpt = load(stem)
        return ckpt.model, ckpt.meta, stem.parent
    trained = load_trained(RunStore(args.runs_dir), args.source, args.model, args.seed)
    return trained.model, trained.meta, trained.dir


def probe(meta: dict[str, Any]) -> torch.Tensor:
    """A probe batch of the data's shape: random inputs, or random token ids for token models."""
    shape, classes = tuple(meta["data"]["in_shape"]), int(meta["data"]["num_classes"])
    g = torch.Generator().manual_seed(0)
    if meta["data"]["name"] in ("hamlet", "bible") or meta["model"]["name"].endswith("lm"):
        return torch.randint(0, classes, (4, *shape), generator=g)
    return torch.rand(4, *shape, generator=g)


def write_grown(
    args: argparse.Namespace,
    before: nn.Module,
    after: nn.Module,
    meta: dict[str, Any],
    folder: Path,
    recipe: dict[str, Any],
    name: str,
) -> None:
    """Save ``after`` with ``recipe`` appended to the structure, verify it reloads, and print what changed."""
    out = Path(args.out) if args.out else folder / name
    out = out.with_suffix("") if out.suffix in (".safetensors", ".json") else out
    for f in (out.with_suffix(".safetensors"), out.with_suffix(".json")):
        if f.exists():
            raise BrickworkError(f"{f} exists; choose another --out (brickwork never overwrites a file)")
    x = probe(meta)
    with torch.no_grad(), evaluating(before), evaluating(after):
        gap = float((before(x) - after(x)).abs().max())
    new_meta = copy.deepcopy({k: v for k, v in meta.items() if k in ("model", "data", "structure", "seed")})
    new_meta["structure"] = [*new_meta.get("structure", []), recipe]
    new_meta |= {"grown_from": str(args.source), "max_abs_change": gap}
    save_model(out, after, new_meta)
    load(out)  # it must load back: the recipes replayed on a freshly built model
    params = (sum(p.numel() for p in before.parameters()), sum(p.numel() for p in after.parameters()))
    print(
        f"wrote {out.with_suffix('.safetensors')} (+ .json): {params[0]:,} -> {params[1]:,} parameters; "
        f"max |grown - original| = {gap:.2e} on a probe batch"
    )


def run(args: argparse.Namespace) -> int:
    fields = ["op", "position", "like", "block", "hidden", "width", "positions", "layers", "factor", "heads"]
    fields += ["count", "logit", "layer", "expert", "mode"]
    given = {f: getattr(args, f) for f in fields if getattr(args, f) is not None}
    try:
        step = GrowSettings(**given, seed=args.grow_seed)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        where = "--" + ".".join(str(p) for p in err["loc"]).replace("_", "-")
        raise ConfigError(where, err["msg"], err.get("input")) from None
    step.check("grow")
    model, meta, folder = load_source(args)
    grown = apply_grow(model, step)
    write_grown(args, model, grown, meta, folder, step.recipe(), f"grow-{step.op}".replace("_", "-"))
    return 0
