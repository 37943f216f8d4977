"""``brickwork upcycle SOURCE --experts 8 --top-k 2``: a trained dense model's FFNs into mixtures of experts.

Sparse upcycling (``ops.grow.upcycle``) on a run or a checkpoint; the result is written as a new
checkpoint that reloads (its recipe is replayed) and computes the dense model's function at the
start with a renormalised router. Loading and writing are ``brickwork grow``'s.
"""

from __future__ import annotations

import argparse

import pydantic

from brickwork.errors import ConfigError
from brickwork.nn.routing import MoESettings
from brickwork.ops.grow import upcycle, upcycle_recipe
from brickwork.verbs.grow import add_source_arguments, load_source, write_grown

HELP = "upcycle a trained model's dense FFNs into mixtures of experts (sparse upcycling)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_source_arguments(parser)
    parser.add_argument("--experts", type=int, default=8, help="experts per layer (default 8)")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    parser.add_argument("--router", default="topk", help="a registered router (brickwork ls router; default topk)")
    parser.add_argument("--granularity", type=int, default=1, help="slices of each FFN (fine-grained experts)")
    parser.add_argument("--layers", help="body layers to convert, e.g. 0,1 (default all)")


def run(args: argparse.Namespace) -> int:
    try:
        routing = MoESettings(top_k=args.top_k, router=args.router)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        raise ConfigError("--" + str(err["loc"][0]).replace("_", "-"), err["msg"], err.get("input")) from None
    routing.check("upcycle")
    layers = None if args.layers is None else [int(v) for v in args.layers.split(",")]
    model, meta, folder = load_source(args)
    moe = upcycle(model, args.experts, routing, args.granularity, layers, seed=0)
    recipe = upcycle_recipe(args.experts, routing, args.granularity, layers)
    write_grown(args, model, moe, meta, folder, recipe, f"upcycle-e{args.experts}-k{args.top_k}")
    return 0
