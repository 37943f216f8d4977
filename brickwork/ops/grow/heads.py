"""More attention heads, starting with no effect on the output.

A head contributes ``softmax(q k^T / sqrt(e)) v W_o[:, head]`` to the attention output, so a new
head whose columns of the output projection are zero adds exact zeros (``zero``: its q, k, v
rows are fresh, so it can learn once ``W_o`` moves), and a copy of a head whose output columns
are divided between the two computes the same sum (``split``, Net2Net applied to whole heads).

brickwork's :class:`~brickwork.nn.attention.MultiHeadAttention` ties its inner width to the
model width (``heads * head_dim = D``); a grown layer is therefore a
:class:`~brickwork.nn.nested.NestedAttention`, the attention brick whose head count and head
width are free (at full width it is plain multi-head attention; its heads are stored head-major,
``[h: q k v]``). The conversion is exact (the same weights, reordered). In a nested model the
sub-networks at width w then take the first ``units(w, H')`` heads of the grown count.

:func:`add_heads` returns a **copy**. Attention that reads a shared padding mask (BERT) is
refused: the nested brick has no padding input.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from brickwork.errors import BrickworkError
from brickwork.nn.attention import MultiHeadAttention
from brickwork.nn.nested import NestedAttention
from brickwork.nn.stack import StackModel
from brickwork.ops.grow.edit import resize
from brickwork.ops.grow.units import WidthMode, check_growth, grow_cols, grow_rows, unit_map
from brickwork.ops.grow.width import stack_model, sublayers


@torch.no_grad()
def as_nested_attention(attn: MultiHeadAttention, where: str = "attn") -> NestedAttention:
    """The same attention as a :class:`NestedAttention` (weights reordered head-major, copied)."""
    if attn._padding:
        raise BrickworkError(f"grow: {where} reads a padding mask, which the head-growable attention does not take")
    d, h = attn.out.in_features, attn.heads
    e = d // h
    w = attn.qkv.weight
    bias = attn.qkv.bias is not None
    new = NestedAttention(d, h, e, attn.causal, attn.dropout, bias, device=w.device, dtype=w.dtype)
    # (3, H, e, D) -> (H, 3, e, D): MultiHeadAttention's [q | k | v] blocks to [h: q k v]
    new.qkv_weight.copy_(w.view(3, h, e, d).transpose(0, 1).reshape(3 * d, d))
    new.out_weight.copy_(attn.out.weight)
    if new.qkv_bias is not None and attn.qkv.bias is not None:
        new.qkv_bias.copy_(attn.qkv.bias.view(3, h, e).transpose(0, 1).reshape(3 * d))
    if new.out_bias is not None and attn.out.bias is not None:
        new.out_bias.copy_(attn.out.bias)
    return new


@torch.no_grad()
def grow_heads_(attn: NestedAttention, heads: int, mode: WidthMode, gen: torch.Generator, where: str = "attn") -> None:
    """Give ``attn`` (in place) ``heads`` heads: copies of random heads (``split``) or fresh ones
    with zero output columns (``zero``)."""
    h, e, d = attn.heads, attn.head_dim, attn.dim
    check_growth(f"{where} (heads)", h, heads)
    g = unit_map(h, heads, mode, gen)
    tensors = {"qkv_weight": grow_rows(attn.qkv_weight.view(h, 3 * e, d), g, 0, h, mode, gen).reshape(-1, d)}
    if attn.qkv_bias is not None:
        tensors["qkv_bias"] = grow_rows(attn.qkv_bias.view(h, 3 * e), g, 0, h, mode, gen).reshape(-1)
    tensors["out_weight"] = grow_cols(attn.out_weight.view(d, h, e), g, 1, h, mode).reshape(d, heads * e)
    resize(attn, tensors, heads=heads)


def add_heads(
    model: nn.Module,
    heads: int,
    layers: Sequence[int] | None = None,
    mode: WidthMode = "zero",
    seed: int = 0,
    in_place: bool = False,
) -> StackModel:
    """A copy of ``model`` whose chosen body layers' attention (``layer.attn``) has ``heads`` heads.

    Args:
        model: a stack model of transformer blocks.
        heads: the new head count H' > H (each head keeps its width).
        layers: body layer indices (default all).
        mode: ``zero`` (new heads start with no effect) or ``split`` (copies of random heads).
        seed: draws the copied heads or the new heads' q, k, v weights.
        in_place: edit ``model`` itself.

    Raises:
        BrickworkError: a layer out of range or without attention, or H' <= H.
    """
    out = stack_model(model, "add_heads")
    if not in_place:
        out = copy.deepcopy(out)
    gen = torch.Generator().manual_seed(seed)
    kinds = (MultiHeadAttention, NestedAttention)
    for i, attn in sublayers(out, layers, "attn", kinds, "multi-head attention", "add_heads").items():
        where = f"body.layers.{i}.attn"
        if isinstance(attn, MultiHeadAttention):
            attn = as_nested_attention(attn, where)
        assert isinstance(attn, NestedAttention)
        grow_heads_(attn, heads, mode, gen, where)
        out.body.layers[i].attn = attn
    return out
