"""Depth growth that preserves the function: insert body layers that start as the identity.

A residual block ``x + f(x)`` is the identity when the last projection of every branch is zero
(the zero-initialised output projections of ReZero-style and "Staged Training" growth; Shen et
al., 2022, and Gong et al., 2019, for stacking BERT). :func:`identity_block` makes such a block
from a copy of any residual brick of brickwork (a transformer block, pre- or post-norm, the
attention and FFN sublayers of any kind it knows: dense, nested, MoE, MoEfied), and a
non-residual layer the identity Net2DeeperNet's way (Chen et al., 2016, section 3.2): an
identity weight, exact when the activation is idempotent on the inputs it sees (ReLU after
ReLU, or no activation). :func:`deepen` inserts it into a **copy** of a stack model.

Post-norm blocks (``norm(x + f(x))``) are not the identity with a zero branch, so they are
refused. Batch-normalised conv blocks are the identity in evaluation mode (running statistics),
which is what "before any training" means for them.
"""

from __future__ import annotations

import copy
from typing import cast

import torch
from torch import Tensor, nn

from brickwork.errors import BrickworkError
from brickwork.nn.activations import ACTIVATIONS
from brickwork.nn.attention import MultiHeadAttention
from brickwork.nn.conv import ConvBlock
from brickwork.nn.ffn import DenseLayer, FeedForward
from brickwork.nn.moe import GatedExpert, MoE
from brickwork.nn.nested import NestedAttention, NestedConv2d, NestedLinear
from brickwork.nn.residual import ResidualFFN
from brickwork.nn.routing import GroupedFFNExperts
from brickwork.nn.sparse import GroupLinear, LinearAct
from brickwork.nn.transformer import PostNormBlock, TransformerBlock, ZeroBranch
from brickwork.ops.grow.edit import weight, zero_
from brickwork.ops.grow.width import stack_model
from brickwork.ops.moefy import NeuronExperts, OutputBias


@torch.no_grad()
def zero_output_(branch: nn.Module, where: str = "branch") -> None:
    """Make a residual branch output exact zeros (in place) by zeroing its last projections.

    Raises:
        BrickworkError: a branch whose output projection this does not know.
    """
    if isinstance(branch, ZeroBranch):
        return
    if isinstance(branch, FeedForward):
        zero_(branch.down, "weight", "bias")
    elif isinstance(branch, MultiHeadAttention):
        zero_(branch.out, "weight", "bias")
    elif isinstance(branch, NestedAttention):
        zero_(branch, "out_weight", "out_bias")
    elif isinstance(branch, MoE):
        zero_output_(branch.experts, f"{where}.experts")
        if branch.shared is not None:
            zero_output_(branch.shared, f"{where}.shared")
    elif isinstance(branch, (GroupedFFNExperts, NeuronExperts)):  # stacked expert banks
        zero_(branch, "w_out", "b_out")
    elif isinstance(branch, GatedExpert):
        zero_output_(branch.expert, f"{where}.expert")
    elif isinstance(branch, nn.ModuleList):  # a list of experts
        for i, e in enumerate(branch):
            zero_output_(e, f"{where}.{i}")
    elif isinstance(branch, OutputBias):
        zero_(branch, "bias")
    else:
        raise BrickworkError(f"grow: cannot zero the output of {where} ({type(branch).__name__})")


@torch.no_grad()
def identity_block(layer: nn.Module, where: str = "layer") -> nn.Module:
    """A copy of ``layer`` initialised to compute the identity.

    Residual blocks get zero output projections (every other weight is kept, so the block
    trains like its original from there); dense and convolution layers get an identity weight
    and zero bias (Net2DeeperNet), which needs a square layer and an activation that is the
    identity on its inputs (ReLU, fed by ReLU, or none), and a conv block of stride 1 whose
    norm is none or batch norm (set to the identity in evaluation mode).

    Raises:
        BrickworkError: ``layer`` cannot start as the identity (with the reason).
    """
    block = copy.deepcopy(layer, _shared_state(layer))
    if isinstance(block, PostNormBlock):
        raise BrickworkError(
            f"grow: {where} is a post-norm block, norm(x + f(x)), which no zero branch makes the identity"
        )
    if isinstance(block, TransformerBlock):
        zero_output_(block.attn, f"{where}.attn")
        zero_output_(block.ffn, f"{where}.ffn")
        return block
    if isinstance(block, ResidualFFN):
        zero_output_(block.ffn, f"{where}.ffn")
        return block
    if isinstance(block, (DenseLayer, LinearAct)):
        if block.act not in (ACTIVATIONS["relu"], ACTIVATIONS["identity"]):
            raise BrickworkError(
                f"grow: {where} has an activation that is not the identity on its inputs (only relu after relu, or "
                "identity, are); insert a residual block (block: residual_ffn) instead"
            )
        _identity_linear(block.linear, where)
        return block
    if isinstance(block, ConvBlock):
        if block.conv.stride not in (1, (1, 1)):
            raise BrickworkError(f"grow: {where} has stride {block.conv.stride}; an identity conv block needs stride 1")
        _identity_conv(block.conv, where)
        if isinstance(block.norm, nn.BatchNorm2d):
            bn = block.norm
            zero_(bn, "running_mean", "bias")
            cast(Tensor, bn.running_var).fill_(1.0)
            weight(bn).fill_((1.0 + bn.eps) ** 0.5)  # (x - 0) / sqrt(1 + eps) * sqrt(1 + eps) = x
        elif not isinstance(block.norm, nn.Identity):
            raise BrickworkError(f"grow: {where}.norm ({type(block.norm).__name__}) is not the identity at any weights")
        return block
    raise BrickworkError(f"grow: cannot make {where} ({type(block).__name__}) start as the identity")


def needs_relu_input(block: nn.Module) -> bool:
    """Whether an identity-initialised ``block`` is the identity only on non-negative inputs (a ReLU layer)."""
    if isinstance(block, ConvBlock):
        return True
    return isinstance(block, (DenseLayer, LinearAct)) and block.act is ACTIVATIONS["relu"]


def ends_in_relu(module: nn.Module) -> bool:
    """Whether every output of ``module`` has passed a ReLU last (so a ReLU leaves it unchanged)."""
    if isinstance(module, ConvBlock):
        return True
    if isinstance(module, nn.Sequential) and len(module):
        return ends_in_relu(module[-1])
    return isinstance(module, (DenseLayer, LinearAct)) and module.act is ACTIVATIONS["relu"]


def _shared_state(layer: nn.Module) -> dict[int, object]:
    """A deepcopy memo that keeps state shared with the rest of the model shared (padding masks):
    a copied attention layer must read the mask its model's stem writes."""
    memo: dict[int, object] = {}
    for m in layer.modules():
        for holder in getattr(m, "_padding", []):
            memo[id(holder)] = holder
    return memo


def _identity_linear(linear: nn.Module, where: str) -> None:
    if isinstance(linear, GroupLinear):
        raise BrickworkError(f"grow: {where} is group-connected; an identity needs a dense square layer")
    w = weight(linear)
    if not isinstance(linear, (nn.Linear, NestedLinear)) or w.shape[0] != w.shape[1]:
        raise BrickworkError(
            f"grow: {where} is not a square dense layer; an identity needs equal input and output width"
        )
    w.copy_(torch.eye(w.shape[0], dtype=w.dtype))
    zero_(linear, "bias")


def _identity_conv(conv: nn.Module, where: str) -> None:
    w = weight(conv)
    if not isinstance(conv, (nn.Conv2d, NestedConv2d)) or w.shape[0] != w.shape[1] or w.shape[-1] % 2 == 0:
        raise BrickworkError(f"grow: {where}.conv is not a square odd-sized convolution; an identity needs one")
    w.zero_()
    c, mid = w.shape[-1] // 2, torch.arange(w.shape[0])
    w[mid, mid, c, c] = 1.0
    zero_(conv, "bias")


def residual_ffn_block(dim: int, hidden: int, act: str = "gelu", like: nn.Module | None = None) -> ResidualFFN:
    """A pre-norm residual FFN ``x + FFN(LN(x))`` with a zero output projection: the identity on (..., dim).

    Inserts depth into any stack whose hidden state is (..., dim), also where the layers are not
    residual (an MLP of GELU layers). ``like``: a module whose parameters give device and dtype.
    """
    p = next(like.parameters(), None) if like is not None else None
    block = ResidualFFN(dim, FeedForward(dim, hidden, act))  # type: ignore[arg-type]
    if p is not None:
        block = block.to(device=p.device, dtype=p.dtype)
    zero_output_(block.ffn)
    return block


def deepen(
    model: nn.Module,
    position: int,
    block: nn.Module | None = None,
    like: int | None = None,
    in_place: bool = False,
) -> nn.Module:
    """A copy of ``model`` with an identity-starting layer inserted before body layer ``position``.

    Args:
        model: a stack model.
        position: index in ``0 .. len(body)`` the new layer takes (``len(body)``: at the end;
            negative counts from the end, ``-1`` meaning after the last layer).
        block: the layer to insert, made the identity by :func:`identity_block` (a copy is
            inserted); default: a copy of body layer ``like``.
        like: which body layer to copy when ``block`` is None (default: the layer before
            ``position``, or the first layer when inserting at 0).
        in_place: edit ``model`` itself.

    Raises:
        BrickworkError: a position or ``like`` out of range, or a layer that cannot start as the identity.
    """
    out = stack_model(model, "deepen")
    if not in_place:
        out = copy.deepcopy(out)
    n = len(out.body)
    pos = position if position >= 0 else n + 1 + position
    if not 0 <= pos <= n:
        raise BrickworkError(f"deepen: position {position} is out of range; the body has {n} layers (0 .. {n})")
    if block is None:
        src = (pos - 1 if pos > 0 else 0) if like is None else like
        if not -n <= src < n:
            raise BrickworkError(f"deepen: like={like} is out of range; the body has {n} layers")
        new = identity_block(out.body.layers[src], f"body.layers.{src % n}")
    else:
        new = identity_block(block, "block")
    before = out.body.layers[pos - 1] if pos > 0 else out.stem
    if needs_relu_input(new) and not ends_in_relu(before):
        where = f"body.layers.{pos - 1}" if pos > 0 else "stem"
        raise BrickworkError(
            f"deepen: an identity ReLU layer at position {pos} needs ReLU outputs before it, and {where} "
            "does not end in a ReLU; insert a residual block (block: residual_ffn) instead"
        )
    layers = list(out.body.layers)
    layers.insert(pos, new)
    out.body.layers = nn.ModuleList(layers)
    return out
