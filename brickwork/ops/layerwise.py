"""Layer-wise growth on a frozen substrate (Growing Transformers, Bochkov, 2025, arXiv 2507.07129).

The paper grows a deep transformer "by progressively stacking and training one layer at a time":
the input embeddings are frozen from the start (the fixed substrate), the trained lower layers
are frozen when a layer is added, and only the new layer (with the output head) is trained;
its v2 adds LoRA over the whole frozen stack as depth increases. This module holds the model
edits of that pipeline; the loop that trains each phase is ``train.layerwise``.

- :func:`append_layer`: a copy of a stack model with one more body layer on top, freshly
  initialised as the paper does (``init="fresh"``: a copy of a template layer with every
  parameter re-drawn by its module's ``reset_parameters``), or a copy of the top layer
  (``init="copy"``).
- :func:`set_trainable`: which parameters a phase trains (the new layers, the head, adapters);
  everything else frozen.
- :func:`add_lora`: the frozen stack's linear layers wrapped in :class:`~brickwork.nn.adapters.LoRALinear`
  (a copy; the output is bit-identical until the adapters train, ``B`` being zero).
- :func:`specialists`: copies of a model with re-drawn bodies and heads around one shared stem,
  composed by averaging their logits (the paper's composition of specialists);
  :func:`compose_like` replays that structure.
- :func:`grow_layers_like`: the structure a ``grow_layers`` recipe describes, replayed on a
  freshly built model (shapes only; the weights are loaded afterwards).

A model edit here copies its input (``copy.deepcopy``) unless its name ends in ``_`` (in place).
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from brickwork.errors import BrickworkError
from brickwork.nn.adapters import LoRALinear
from brickwork.nn.ensemble import Combine, Ensemble
from brickwork.nn.stack import StackModel, stack_of
from brickwork.ops.grow.depth import identity_block

#: How a new layer starts: re-drawn as a fresh layer (the paper), a copy of the top layer, or
#: re-drawn and then made the identity (``ops.grow.identity_block``: zero output projections of a
#: residual block), so the grown model starts computing exactly what the shallower one computed.
LayerInit = Literal["fresh", "copy", "identity"]


def reinit_(module: nn.Module, seed: int | None = None) -> nn.Module:
    """Re-draw every parameter of ``module`` in place by its submodules' ``reset_parameters``.

    With ``seed``, the draw uses its own generator state and leaves the global RNG as it was.
    """

    def draw() -> None:
        for m in module.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset) and not isinstance(m, LoRALinear):
                reset()

    if seed is None:
        draw()
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            draw()
    return module


def append_layer(
    model: nn.Module, template: nn.Module | None = None, *, init: LayerInit = "fresh", seed: int | None = None
) -> StackModel:
    """A copy of stack model ``model`` with one more body layer on top.

    Args:
        model: a :class:`StackModel`; not changed.
        template: the module the new layer is made from (deep-copied); default the top body layer.
            Pass the original top layer when the stack's layers have since been wrapped by adapters,
            so the new layer is a plain one.
        init: ``fresh`` re-draws the new layer's parameters (``reset_parameters``, seeded by
            ``seed``); ``copy`` keeps the template's weights; ``identity`` re-draws them and then
            starts the layer as the identity (function-preserving growth, H3's ``ops.grow``).
        seed: seed of the fresh draw (None: the global RNG).

    Raises:
        TypeError: ``model`` is not a stack model.
        BrickworkError: ``init="identity"`` for a layer that cannot start as the identity.
    """
    grown = copy.deepcopy(stack_of(model))
    layer = copy.deepcopy(template if template is not None else grown.body.layers[-1])
    if init in ("fresh", "identity"):
        reinit_(layer, seed)
    if init == "identity":
        layer = identity_block(layer, f"body.layers.{len(grown.body)}")
    grown.body.layers.append(layer)
    return grown


def _matches(path: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


def set_trainable_(model: nn.Module, patterns: Sequence[str]) -> int:
    """Freeze every parameter of ``model`` except those whose path matches a glob in ``patterns``
    (in place); adapter parameters (``lora_a``, ``lora_b``) are matched like any other.

    Returns:
        The number of trainable parameters.

    Raises:
        BrickworkError: no parameter matches (the phase would train nothing).
    """
    n = 0
    for name, p in model.named_parameters():
        on = _matches(name, patterns)
        p.requires_grad_(on)
        n += p.numel() if on else 0
    if n == 0:
        raise BrickworkError(f"layer-wise growth: no parameter matches {list(patterns)}; nothing would train")
    return n


def linear_paths(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Paths of the plain ``nn.Linear`` modules of ``model`` matching a glob of ``patterns``."""
    return [
        name
        for name, m in model.named_modules()
        if type(m) is nn.Linear and _matches(name, patterns) and ".base" not in f".{name}"
    ]


def add_lora_(model: nn.Module, paths: Sequence[str], rank: int, alpha: float = 1.0) -> nn.Module:
    """Wrap the linear layers at ``paths`` in :class:`LoRALinear` (in place); returns ``model``.

    Raises:
        BrickworkError: a path names no plain linear layer.
    """
    for path in paths:
        parent_path, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        base = getattr(parent, leaf, None)
        if type(base) is not nn.Linear:
            raise BrickworkError(f"add_lora: {path!r} is not a plain linear layer ({type(base).__name__})")
        setattr(parent, leaf, LoRALinear(base, rank, alpha))
    return model


def add_lora(model: nn.Module, paths: Sequence[str], rank: int, alpha: float = 1.0) -> nn.Module:
    """A copy of ``model`` with the linear layers at ``paths`` wrapped in LoRA adapters of ``rank``.

    The copy computes exactly what ``model`` computes until its adapters are trained.
    """
    return add_lora_(copy.deepcopy(model), paths, rank, alpha)


def grow_layers_like(model: nn.Module, recipe: Mapping[str, Any]) -> StackModel:
    """Replay a ``grow_layers`` recipe on a freshly built ``model``: the added layers (copies of
    the original top layer; weights come from the checkpoint), then the LoRA wrappers.

    The recipe is ``{"op": "grow_layers", "added": n, "lora_rank": r, "lora_alpha": a,
    "lora_paths": [...]}`` (``lora_rank`` 0: no adapters).
    """
    grown = stack_of(model)
    template = grown.body.layers[-1]
    for _ in range(int(recipe["added"])):
        grown = append_layer(grown, template, init="copy")
    if int(recipe.get("lora_rank", 0)) > 0:
        add_lora_(grown, recipe["lora_paths"], int(recipe["lora_rank"]), float(recipe.get("lora_alpha", 1.0)))
    return grown


def specialists(
    model: nn.Module, count: int, *, share_stem: bool = True, seed: int | None = None, combine: Combine = "logits"
) -> Ensemble:
    """``count`` specialists made from ``model``, composed as an :class:`~brickwork.nn.ensemble.Ensemble`.

    Each specialist is a copy of ``model`` whose body and head are re-drawn (seeded by ``seed + i``
    when ``seed`` is given); with ``share_stem`` they all hold ``model``'s stem itself, one module
    (Growing Transformers' shared frozen embeddings: the docking port every specialist reads).

    Raises:
        TypeError: ``model`` is not a stack model.
    """
    base = stack_of(model)
    members = []
    for i in range(count):
        m = copy.deepcopy(base)
        if share_stem:
            m.stem = base.stem
        reinit_(m.body, None if seed is None else seed + 2 * i)
        reinit_(m.head, None if seed is None else seed + 2 * i + 1)
        members.append(m)
    return Ensemble(members, combine=combine, share_stem=share_stem)


def compose_like(model: nn.Module, recipe: Mapping[str, Any]) -> Ensemble:
    """Replay a ``compose`` recipe (``{"op": "compose", "members": k, "combine": ..., "share_stem": ...}``)
    on a freshly built ``model``: the ensemble's structure (weights come from the checkpoint)."""
    return specialists(model, int(recipe["members"]), share_stem=bool(recipe["share_stem"]), combine=recipe["combine"])
