"""Width growth that preserves the function: MLP / CNN / group-sparse layers, FFN hidden width.

Each operation returns a widened **copy** (``in_place=True`` edits the model given instead). The
new units start by one of the two Net2Net choices of :mod:`.units`: ``split`` (copies of random
old units, the consumer's weights divided among the copies; Chen et al., 2016, Net2WiderNet) or
``zero`` (fresh incoming weights, zero outgoing weights). Both are exact before any training:
``split`` within float round-off (the division), ``zero`` bit-exact in the outputs of the old
units.

* :func:`widen_ffn`: the hidden width H of every chosen ``layer.ffn`` (a dense or nested
  :class:`~brickwork.nn.ffn.FeedForward`, GLU included: ``up`` and ``gate`` rows move together).
* :func:`widen_layers`: the representation between two consecutive pieces of a stack model
  (stem, body layers, head): dense layers, nested dense layers, convolution blocks (channels,
  batch-norm statistics copied) and :class:`~brickwork.nn.sparse.GroupLinear` layers, which grow
  by whole groups. A group-connected consumer needs no division: its old output groups keep their
  wiring and never read the new input groups, so it is exact in both modes.

What cannot be widened exactly is refused with one line naming the module: a GroupNorm (its
statistics span all channels), a head with a LayerNorm, a growth to a size not larger than the
current one. Nested models are exact at full width; their sub-networks at width w take the
first ``units(w, n')`` of the grown size, so they are re-defined by the growth (as slicing would
define them for a model built at that size). The residual width of a transformer is
:mod:`.residual`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from brickwork.errors import BrickworkError
from brickwork.nn.conv import ConvBlock
from brickwork.nn.embed import FlattenEmbed
from brickwork.nn.ffn import DenseLayer, FeedForward
from brickwork.nn.heads import ClassifierHead
from brickwork.nn.nested import NestedConv2d, NestedLinear
from brickwork.nn.sparse import GroupLinear, LinearAct
from brickwork.nn.stack import StackModel
from brickwork.ops.grow.edit import grow_weight_axis, resize, tensor, weight
from brickwork.ops.grow.units import WidthMode, check_growth, grow_cols, grow_rows, take, unit_map

_LINEAR = (nn.Linear, NestedLinear)
_CONV = (nn.Conv2d, NestedConv2d)


def stack_model(model: nn.Module, op: str) -> StackModel:
    """``model`` as a :class:`StackModel`, or one clear error naming the operation."""
    if not isinstance(model, StackModel):
        raise BrickworkError(f"{op}: needs a stack model (stem, body, head), got {type(model).__name__}")
    return model


def sublayers(
    model: StackModel, layers: Sequence[int] | None, name: str, kind: type | tuple[type, ...], what: str, op: str
) -> dict[int, nn.Module]:
    """The sub-module ``name`` (``ffn``, ``attn``) of each chosen body layer, by layer index, checked to be ``kind``.

    Raises:
        BrickworkError: a layer index out of range, or a sub-module of another kind (``what`` it should be).
    """
    n = len(model.body)
    out: dict[int, nn.Module] = {}
    for i in range(n) if layers is None else layers:
        if not -n <= i < n:
            raise BrickworkError(f"{op}: body layer {i} is out of range; the body has {n} layers")
        sub = getattr(model.body.layers[i], name, None)
        if not isinstance(sub, kind):
            raise BrickworkError(f"{op}: body.layers.{i % n}.{name} is {type(sub).__name__}, not {what}")
        assert isinstance(sub, nn.Module)
        out[i % n] = sub
    return out


def _inner(m: nn.Module, where: str, side: str) -> tuple[nn.Module, str]:
    """The linear-like module doing the work of ``m`` on its ``side`` ("out" or "in"), and its path."""
    if isinstance(m, (DenseLayer, LinearAct)):
        return m.linear, f"{where}.linear"
    if isinstance(m, FlattenEmbed):
        return m.proj, f"{where}.proj"
    if isinstance(m, ConvBlock):
        return m.conv, f"{where}.conv"
    if isinstance(m, ClassifierHead) and side == "in":
        if not isinstance(m.norm, nn.Identity):
            raise BrickworkError(f"grow: {where} normalises over its input width (LayerNorm); widening it is not exact")
        return m.proj, f"{where}.proj"
    if isinstance(m, nn.Sequential) and len(m):
        i = len(m) - 1 if side == "out" else next((k for k, c in enumerate(m) if any(c.parameters())), 0)
        return _inner(m[i], f"{where}.{i}", side)
    if isinstance(m, (*_LINEAR, *_CONV, GroupLinear)):
        return m, where
    raise BrickworkError(
        f"grow: {where} ({type(m).__name__}) is not a dense, nested, convolutional or group-connected layer "
        "whose width can grow"
    )


def _leaf(m: nn.Module, where: str, side: str) -> tuple[nn.Module, str]:
    leaf, path = _inner(m, where, side)
    while leaf is not m and not isinstance(leaf, (*_LINEAR, *_CONV, GroupLinear)):
        m, where = leaf, path
        leaf, path = _inner(m, where, side)
    return leaf, path


def out_width(m: nn.Module, where: str = "layer") -> int:
    """Output units (features or channels) of a producer module."""
    leaf, _ = _leaf(m, where, "out")
    if isinstance(leaf, GroupLinear):
        return leaf.d_out
    return int(weight(leaf).shape[0])


def _group_map(old_groups: int, new_groups: int, block: int, mode: WidthMode, gen: torch.Generator) -> Tensor:
    """A unit map that copies whole groups of ``block`` units (group-major unit order)."""
    gamma = unit_map(old_groups, new_groups, mode, gen)
    return (gamma[:, None] * block + torch.arange(block)).flatten()


def plan_units(
    producer: tuple[nn.Module, str], consumer: tuple[nn.Module, str], new: int, mode: WidthMode, gen: torch.Generator
) -> Tensor:
    """The unit map of one representation grown to ``new`` units, respecting the groups on both sides.

    Raises:
        BrickworkError: ``new`` is not larger, or does not split into the groups of a
            group-connected producer or consumer.
    """
    p, p_path = _leaf(*producer, "out")
    c, c_path = _leaf(*consumer, "in")
    old = out_width(*producer)
    check_growth(f"{p_path} (output)", old, new)
    for layer, path, block in ((p, p_path, "block_out"), (c, c_path, "block_in")):
        if isinstance(layer, GroupLinear) and (new - old) % getattr(layer, block):
            raise BrickworkError(
                f"grow: {path} is group-connected with groups of {getattr(layer, block)} units; "
                f"the {new - old} new units must be a multiple of it"
            )
    if isinstance(p, GroupLinear):
        return _group_map(p.groups_out, new // p.block_out, p.block_out, mode, gen)
    return unit_map(old, new, mode, gen)


@torch.no_grad()
def grow_out_(m: nn.Module, g: Tensor, mode: WidthMode, gen: torch.Generator, where: str = "layer") -> None:
    """Grow the output units of producer ``m`` (in place) by the unit map ``g``."""
    if isinstance(m, ConvBlock):
        _grow_norm_(m, g, where)
    leaf, path = _leaf(m, where, "out")
    old = out_width(m, where)
    if isinstance(leaf, GroupLinear):
        _grow_group_out_(leaf, g, old, mode, gen)
        return
    b = tensor(leaf, "bias")
    bias = None if b is None else grow_rows(b, g, 0, old, mode, gen)
    grow_weight_axis(leaf, 0, grow_rows(weight(leaf), g, 0, old, mode, gen), bias)


@torch.no_grad()
def grow_in_(m: nn.Module, g: Tensor, old: int, mode: WidthMode, where: str = "layer") -> None:
    """Grow the input units of consumer ``m`` (in place) to follow a producer grown by ``g``."""
    leaf, _ = _leaf(m, where, "in")
    if isinstance(leaf, GroupLinear):
        _grow_group_in_(leaf, len(g))
        return
    grow_weight_axis(leaf, 1, grow_cols(weight(leaf), g, 1, old, mode), None)


def _grow_norm_(block: ConvBlock, g: Tensor, where: str) -> None:
    norm = block.norm
    if isinstance(norm, nn.Identity):
        return
    if not isinstance(norm, nn.BatchNorm2d):
        raise BrickworkError(
            f"grow: {where}.norm ({type(norm).__name__}) normalises across channels; widening it is not exact "
            "(batch norm or no norm can be widened)"
        )
    tensors = {n: take(t, g, 0) for n, t in norm.named_parameters(recurse=False)}
    tensors |= {n: take(t, g, 0) for n, t in norm.named_buffers(recurse=False) if t is not None and t.dim() == 1}
    resize(norm, tensors, num_features=len(g))


def _grow_group_out_(layer: GroupLinear, g: Tensor, old: int, mode: WidthMode, gen: torch.Generator) -> None:
    if layer.rewiring is not None:
        raise BrickworkError("grow: a group-connected layer with rewiring attached cannot grow; detach it first")
    b = layer.block_out
    gamma = g.view(-1, b)[:, 0] // b  # the old group each (new) group copies
    old_g = layer.groups_out
    sources = take(layer.sources, gamma, 0)
    if mode == "zero":  # new groups read k input groups of their own, at random
        rows = [
            torch.randperm(layer.groups_in, generator=gen)[: layer.k].sort().values for _ in range(len(gamma) - old_g)
        ]
        if rows:
            sources[old_g:] = torch.stack(rows).to(sources.device)
    tensors = {"sources": sources, "weight": grow_rows(layer.weight, gamma, 0, old_g, mode, gen)}
    if layer.mask is not None:
        tensors["mask"] = take(layer.mask, gamma, 0)
        tensors["weight"] = tensors["weight"] * tensors["mask"]
    if layer.bias is not None:
        tensors["bias"] = grow_rows(layer.bias, g, 0, old, mode, gen)
    resize(layer, tensors, groups_out=len(gamma), d_out=len(g), _plan=None)


def _grow_group_in_(layer: GroupLinear, new: int) -> None:
    # Old output groups keep their sources, so they never read the new input groups: exact.
    perm = torch.cat([layer.in_perm, torch.arange(layer.d_in, new, device=layer.in_perm.device)])
    resize(layer, {"in_perm": perm}, d_in=new, groups_in=new // layer.block_in, _plan=None)


def _copy(model: StackModel, in_place: bool) -> StackModel:
    return model if in_place else copy.deepcopy(model)  # one deepcopy keeps shared sub-bricks shared


def widen_layers(
    model: nn.Module,
    width: int,
    positions: Sequence[int] | None = None,
    mode: WidthMode = "split",
    seed: int = 0,
    in_place: bool = False,
) -> StackModel:
    """A copy of ``model`` whose hidden representations at ``positions`` have ``width`` units.

    Args:
        model: a stack model of dense, nested, convolutional or group-connected layers.
        width: the new number of units (features or channels) at every chosen position.
        positions: 0 is the stem's output, ``i > 0`` the output of body layer ``i - 1`` (the head
            consumes the last); default: every position ``0 .. len(body)``.
        mode: ``split`` or ``zero`` (see the module docstring).
        seed: draws the Net2Net map (``split``) or the new incoming weights (``zero``).
        in_place: edit ``model`` itself instead of a copy.

    Raises:
        BrickworkError: a position out of range, a width not larger than the current one, or a
            layer that cannot be widened exactly.
    """
    out = _copy(stack_model(model, "widen_layers"), in_place)
    pieces: list[tuple[nn.Module, str]] = [(out.stem, "stem")]
    pieces += [(layer, f"body.layers.{i}") for i, layer in enumerate(out.body.layers)]
    pieces.append((out.head, "head"))
    n = len(pieces) - 1
    chosen = list(range(n)) if positions is None else list(positions)
    for k in chosen:
        if not 0 <= k < n:
            raise BrickworkError(f"widen_layers: position {k} is out of range; positions are 0 .. {n - 1}")
    gen = torch.Generator().manual_seed(seed)
    for k in sorted(set(chosen)):
        (producer, p_path), (consumer, c_path) = pieces[k], pieces[k + 1]
        old = out_width(producer, p_path)
        g = plan_units(pieces[k], pieces[k + 1], width, mode, gen)
        grow_out_(producer, g, mode, gen, p_path)
        grow_in_(consumer, g, old, mode, c_path)
    return out


def widen_ffn(
    model: nn.Module,
    hidden: int,
    layers: Sequence[int] | None = None,
    mode: WidthMode = "split",
    seed: int = 0,
    in_place: bool = False,
) -> StackModel:
    """A copy of ``model`` whose body layers' FFNs (``layer.ffn``) have ``hidden`` inner units.

    Works on transformer blocks, residual FFN blocks and nested FFNs; GLU FFNs grow ``up`` and
    ``gate`` by the same map, so every copied neuron computes its original's value.

    Args:
        model: a stack model whose chosen body layers have a :class:`FeedForward` ``ffn``.
        hidden: the new inner width H' > H.
        layers: body layer indices (negative from the end); default all.
        mode, seed, in_place: as :func:`widen_layers`.

    Raises:
        BrickworkError: a layer index out of range, a layer without a dense FFN, or H' <= H.
    """
    out = _copy(stack_model(model, "widen_ffn"), in_place)
    gen = torch.Generator().manual_seed(seed)
    for i, ffn in sublayers(out, layers, "ffn", FeedForward, "a dense FeedForward", "widen_ffn").items():
        assert isinstance(ffn, FeedForward)
        where = f"body.layers.{i}.ffn"
        old = ffn.up.weight.shape[0]
        check_growth(f"{where} (hidden)", old, hidden)
        g = unit_map(old, hidden, mode, gen)
        for proj in (ffn.up, ffn.gate):
            if proj is not None:
                bias = None if proj.bias is None else grow_rows(proj.bias, g, 0, old, mode, gen)
                grow_weight_axis(proj, 0, grow_rows(proj.weight, g, 0, old, mode, gen), bias)
        grow_weight_axis(ffn.down, 1, grow_cols(ffn.down.weight, g, 1, old, mode), None)
    return out
