"""Module-wise training inside a shared meta model: Deep Model Assembling and m2mKD.

One concept, two losses. A target model is divided into K modules (:func:`divide`, :func:`split_model`);
each module is trained in a small shared *meta model* (a shallow model of the same family, one
layer per module, pre-trained end to end first) with its own position replaced by the module
(:func:`meta_hybrid`); the trained modules are put together again (:func:`assemble`) and the whole is
fine-tuned end to end.

* **Deep Model Assembling** (Ni et al., 2023, arXiv 2212.04129; code LeapLabTHU/Deep-Incubation):
  the module is trained on the task loss (phases PT, MT, FT of ``main.py``).
  :func:`deep_model_assembling`.
* **m2mKD** (Lo et al., 2024, arXiv 2402.16918; code kamanphoebe/m2mKD): a *student* module is
  trained to match its *teacher* module, each placed in the same meta model: ``(1 - alpha) * CE +
  alpha * KD`` on the two meta-model outputs (``m2mKDLoss``); then the student is assembled and
  trained end to end on labels. When the student's width differs from the meta model's, linear
  *stitch layers* are put at the module's open ends during its training and dropped on assembly
  (the reference code's default). :func:`module_to_module_kd`.

Everything copies: :func:`split_model` copies the model's parts; the meta parts in a hybrid are frozen
copies; the returned models share nothing with the inputs.

Simplifications, named: the meta model is pre-trained here for a few epochs on the same data
(Deep-Incubation: 300 epochs); modules are trained one after another, not in parallel; the KD
term is batch-mean Hinton KD (the reference code divides the summed KL by the number of logits,
B * K, i.e. a K-times weaker term at the same ``alpha``); no mixup, drop-path or repeated
augmentation.

This module holds the structure (dividing, fitting a module to a position, the hybrid, assembling);
the two methods, which train, are in :mod:`brickwork.train.assemble`, and their training compute is
counted as executed by :func:`brickwork.train.budget.train_counted`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from brickwork.errors import BrickworkError
from brickwork.nn.meta import MetaHybrid, Piece
from brickwork.nn.modes import evaluating
from brickwork.nn.stack import Stack, StackModel
from brickwork.ops.stitch import StitchLayer


class AssembleError(BrickworkError):
    """A model cannot be divided, or a module does not fit the meta model's position."""


# -- dividing and assembling -----------------------------------------------------------------------


def divide(depth: int, modules: int, where: str = "modules") -> list[range]:
    """Body layer ranges of ``modules`` contiguous modules of a ``depth``-layer body, sizes differing by
    at most one (the larger ones first), as Deep-Incubation's ``divided_depths``.

    Raises:
        AssembleError: ``modules`` is below 1 or above ``depth``.
    """
    if not 1 <= modules <= depth:
        raise AssembleError(f"{where}: cannot divide {depth} body layers into {modules} modules; expected 1 to {depth}")
    base, extra = divmod(depth, modules)
    out, start = [], 0
    for i in range(modules):
        n = base + (1 if i < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


def split_model(model: StackModel, modules: int, where: str = "modules") -> list[Piece]:
    """``model`` as ``modules`` pieces (copies): the stem joins the first, the head the last.

    ``assemble(split_model(model, k))`` computes exactly what ``model`` computes.
    """
    ranges = divide(len(model.body), modules, where)
    layers = list(model.body.layers)
    last = len(ranges) - 1
    return [
        Piece(
            [copy.deepcopy(layers[j]) for j in r],
            stem=copy.deepcopy(model.stem) if i == 0 else None,
            head=copy.deepcopy(model.head) if i == last else None,
        )
        for i, r in enumerate(ranges)
    ]


def _joined(pieces: Sequence[Piece]) -> Piece:
    """One piece running ``pieces`` in order (their modules taken as they are)."""
    stems = [p.stem for p in pieces if p.stem is not None]
    heads = [p.head for p in pieces if p.head is not None]
    return Piece(
        [layer for p in pieces for layer in p.body.layers],
        stem=stems[0] if stems else None,
        head=heads[0] if heads else None,
    )


def assemble(pieces: Sequence[Piece]) -> StackModel:
    """The stack model of ``pieces`` in order (their modules taken as they are, not copied).

    Raises:
        AssembleError: the first piece has no stem, the last no head, or one in between has either.
    """
    for i, p in enumerate(pieces):
        if (p.stem is not None) != (i == 0) or (p.head is not None) != (i == len(pieces) - 1):
            raise AssembleError(
                f"assemble: piece {i} of {len(pieces)} has {'a' if p.stem is not None else 'no'} stem and "
                f"{'a' if p.head is not None else 'no'} head; only the first has a stem and only the last a head"
            )
    whole = _joined(pieces)
    assert whole.stem is not None and whole.head is not None
    return StackModel(whole.stem, Stack(list(whole.body.layers)), whole.head)


def meta_hybrid(meta: Sequence[Piece], slot: int, module: Piece) -> MetaHybrid:
    """The meta model (its pieces) with position ``slot`` held by ``module``.

    The meta pieces are copied and frozen; ``module`` is taken as it is, so training the hybrid
    trains ``module``.
    """
    if not 0 <= slot < len(meta):
        raise AssembleError(f"hybrid: position {slot} outside the meta model's {len(meta)} modules")
    before = _joined([copy.deepcopy(p) for p in meta[:slot]])
    after = _joined([copy.deepcopy(p) for p in meta[slot + 1 :]])
    return MetaHybrid(before, module, after)


# -- fitting a module into a position --------------------------------------------------------------


def _features(shape: Sequence[int]) -> int:
    """The feature size of a per-sample hidden shape: channels of (C, H, W), last dim otherwise."""
    return shape[0] if len(shape) == 3 else shape[-1]


def _others(shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(shape[1:]) if len(shape) == 3 else tuple(shape[:-1])


@torch.no_grad()
def boundaries(pieces: Sequence[Piece], x: Tensor) -> list[tuple[int, ...]]:
    """Per-sample shapes between the pieces run in order on ``x``: entry ``i`` is what piece ``i``
    hands on (the last entry is the model's output shape)."""
    out = []
    with evaluating(*pieces):
        for p in pieces:
            x = p(x)
            out.append(tuple(x.shape[1:]))
    return out


#: What a width mismatch message suggests where stitch layers may be used.
ADAPTER_HINT = "set adapters: true for learned stitch layers (m2mKD) or match the widths"
#: ... and where they may not: the modules that go into the final model as they are, and m2mKD's teachers.
SAME_WIDTH_HINT = "this module must fit the meta model as it is: give a meta model of its widths"


def fit_module(
    module: Piece,
    slot: int,
    meta_shapes: Sequence[tuple[int, ...]],
    module_shapes: tuple[tuple[int, ...] | None, tuple[int, ...]],
    *,
    adapters: bool,
    what: str,
    hint: str = ADAPTER_HINT,
) -> Piece:
    """``module`` ready for position ``slot`` of the meta model: itself when the shapes at its ends
    match the meta model's, else wrapped in linear stitch layers (m2mKD's ``pre_stitch`` /
    ``post_stitch``) if ``adapters``; the wrapper shares ``module``'s layers.

    Args:
        module: the module for the position.
        slot: the position.
        meta_shapes: :func:`boundaries` of the meta model's pieces.
        module_shapes: per-sample shape entering ``module`` in its own model (None for the first
            module, which takes the raw input) and the shape it hands on.
        adapters: whether stitch layers may be inserted.
        what: names the module in messages (``student module 1 (body layers 2-3)``).
        hint: what the message suggests when the widths differ and ``adapters`` is off.

    Raises:
        AssembleError: a shape differs at an end and ``adapters`` is off, or it differs in more
            than the feature size (the number of tokens, the image size).
    """
    last = slot == len(meta_shapes) - 1
    own_in, own_out = module_shapes
    # (what reaches the module's end, what that end needs): its input, then its output
    ends = [(meta_shapes[slot - 1] if slot > 0 else None, own_in, "takes"), (own_out, meta_shapes[slot], "hands on")]
    stitch: list[nn.Module | None] = [None, None]
    for k, (given, wanted, verb) in enumerate(ends):
        if given is None or wanted is None or given == wanted:
            continue
        mine, theirs = (wanted, given) if k == 0 else (given, wanted)
        problem = f"{what} {verb} per-sample shape {mine} but the meta model has {theirs} at position {slot}"
        if _others(given) != _others(wanted) or (k == 1 and last):
            raise AssembleError(f"{problem}; they differ in more than the feature size, which no stitch layer mends")
        if not adapters:
            raise AssembleError(f"{problem}; {hint}")
        stitch[k] = StitchLayer(_features(given), _features(wanted))
    pre, post = stitch
    if pre is None and post is None:
        return module
    layers = ([pre] if pre is not None else []) + list(module.body.layers) + ([post] if post is not None else [])
    return Piece(layers, stem=module.stem, head=module.head)


def module_shapes(
    model: StackModel, ranges: Sequence[range], x: Tensor
) -> list[tuple[tuple[int, ...] | None, tuple[int, ...]]]:
    """For each module of ``model`` (body layer ranges): the per-sample shape entering it (None
    for the first) and the shape it hands on (the output's for the last)."""
    with evaluating(model), torch.no_grad():
        h = model.stem(x)
        hidden = [tuple(t.shape[1:]) for t in model.body.taps(h, list(range(len(model.body))))]
        out_shape = tuple(model(x).shape[1:])
        entering = tuple(h.shape[1:])
    shapes: list[tuple[tuple[int, ...] | None, tuple[int, ...]]] = []
    for i, r in enumerate(ranges):
        first = None if i == 0 else (entering if r.start == 0 else hidden[r.start - 1])
        shapes.append((first, out_shape if i == len(ranges) - 1 else hidden[r.stop - 1]))
    return shapes


def fitted_modules(
    model: StackModel, meta: StackModel, modules: int, probe: Tensor, *, adapters: bool | None, role: str
) -> tuple[list[Piece], list[Piece]]:
    """``model``'s ``modules`` modules (copies) and each made ready for its position of ``meta``
    (:func:`fit_module`: itself, or wrapped in stitch layers sharing its layers), all checked on the
    input batch ``probe`` before anything trains. ``adapters=None``: stitch layers are not an option
    for these modules (a target's, a teacher's), and a width mismatch says so.

    Raises:
        AssembleError: ``modules`` above either depth, or a module that does not fit its position.
    """
    ranges = divide(len(model.body), modules, f"{role} modules")
    meta_shapes = boundaries(split_model(meta, modules, "meta model"), probe)
    own = module_shapes(model, ranges, probe)
    pieces = split_model(model, modules)
    slots = [
        fit_module(
            p,
            i,
            meta_shapes,
            own[i],
            adapters=bool(adapters),
            what=f"{role} module {i} (body layers {r.start}-{r.stop - 1})",
            hint=ADAPTER_HINT if adapters is not None else SAME_WIDTH_HINT,
        )
        for i, (p, r) in enumerate(zip(pieces, ranges, strict=True))
    ]
    return pieces, slots
