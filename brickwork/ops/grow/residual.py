"""The residual width of a transformer (or residual MLP), grown by an integer factor, exactly.

A residual stream feeds LayerNorms, whose mean and variance over D change when new dimensions
are added, so zero-initialised new dimensions are not function-preserving. Copying every
dimension ``m`` times is: the stream becomes ``[x, x, ..., x]`` (D' = m D), whose mean and
variance equal those of ``x``, so ``LN'([x]*m) = [LN(x)]*m`` with the norm's weights copied;
every reader of the stream divides its input columns by ``m`` (Net2Net's split with a uniform
map, as in the symmetric expansion of LEMON, Wang et al., 2023, "Lossless Model Expansion").
Writers of the stream (the stem, every branch's output projection) copy their rows.

Attention widens with the stream (brickwork's attention has inner width D): each head's width
e becomes m e with every q, k, v unit copied; since ``q' . k' = m q . k`` and the scaled
dot-product divides by ``sqrt(m e)`` instead of ``sqrt(e)``, the copied query rows are
multiplied by ``1 / sqrt(m)`` so that the attention logits are unchanged; the output
projection's input columns are divided by m.

:func:`widen_residual` returns the widened **copy**. Exact within float round-off (the divisions
and the norm statistics summed in another order), checked to 1e-10 in float64.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from brickwork.errors import BrickworkError
from brickwork.nn.attention import MultiHeadAttention
from brickwork.nn.embed import FlattenEmbed, PatchEmbed, TokenEmbed
from brickwork.nn.ffn import FeedForward
from brickwork.nn.heads import ClassifierHead
from brickwork.nn.moe import GatedExpert, MoE
from brickwork.nn.nested import NestedAttention
from brickwork.nn.residual import ResidualFFN
from brickwork.nn.routing import ExpertList, GroupedFFNExperts
from brickwork.nn.stack import StackModel
from brickwork.nn.transformer import PostNormBlock, TransformerBlock, ZeroBranch
from brickwork.ops.grow.edit import resize, tensor, weight
from brickwork.ops.grow.units import spread, take, tiled_map
from brickwork.ops.moefy import NeuronExperts, OutputBias


def widen_residual(model: nn.Module, factor: int, in_place: bool = False) -> StackModel:
    """A copy of ``model`` whose residual width D is ``factor * D``, computing the same function.

    Args:
        model: a stack model whose stem writes a residual stream (token, patch or flatten
            embedding), whose body layers are transformer (pre- or post-norm) or residual FFN
            blocks with dense, nested or MoE sublayers, and whose head is a classifier head.
        factor: m >= 2; every stream dimension is copied m times.
        in_place: edit ``model`` itself.

    Raises:
        BrickworkError: ``factor`` < 2, or a module the stream passes that this does not know.
    """
    if not isinstance(model, StackModel):
        raise BrickworkError(f"widen_residual: needs a stack model (stem, body, head), got {type(model).__name__}")
    if factor < 2:
        raise BrickworkError(
            f"widen_residual: factor must be an integer >= 2 (LayerNorm statistics are kept only by copying "
            f"every dimension), got {factor}"
        )
    out = model if in_place else copy.deepcopy(model)
    with torch.no_grad():
        _stem_(out.stem, factor, "stem")
        for i, layer in enumerate(out.body.layers):
            _block_(layer, factor, f"body.layers.{i}")
        _head_(out.head, factor, "head")
    return out


def _map(d: int, m: int) -> Tensor:
    return tiled_map(d, m)


def _writes(module: nn.Module, m: int, w_dim: int = 0) -> None:
    """A linear or convolution writing the stream: output rows (and bias) copied."""
    w = weight(module)
    s = _map(w.shape[w_dim], m)
    tensors = {"weight": take(w, s, w_dim)}
    if (b := tensor(module, "bias")) is not None:
        tensors["bias"] = take(b, s, 0)
    sizes = {"out_features": len(s)} if hasattr(module, "out_features") else {"out_channels": len(s)}
    resize(module, tensors, **sizes)


def _reads(module: nn.Module, m: int) -> None:
    """A linear reading the stream: input columns divided among the copies."""
    w = weight(module)
    d = w.shape[1]
    resize(module, {"weight": spread(w, _map(d, m), 1, d)}, in_features=m * d)


def _norm_(norm: nn.Module, m: int, where: str) -> None:
    if isinstance(norm, nn.Identity):
        return
    if not isinstance(norm, nn.LayerNorm) or len(norm.normalized_shape) != 1:
        raise BrickworkError(f"widen_residual: {where} ({type(norm).__name__}) is not a LayerNorm over the width")
    d = norm.normalized_shape[0]
    tensors = {n: take(t, _map(d, m), 0) for n, t in norm.named_parameters(recurse=False)}
    resize(norm, tensors, normalized_shape=(m * d,))


def _stem_(stem: nn.Module, m: int, where: str) -> None:
    if isinstance(stem, TokenEmbed):
        for emb in (stem.tok, stem.pos):
            d = emb.embedding_dim
            resize(emb, {"weight": take(emb.weight, _map(d, m), 1)}, embedding_dim=m * d)
    elif isinstance(stem, PatchEmbed):
        d = stem.pos.shape[2]
        _writes(stem.proj, m)
        resize(stem, {"pos": take(stem.pos, _map(d, m), 2)})
    elif isinstance(stem, FlattenEmbed):
        _writes(stem.proj, m)  # GELU is elementwise: copied rows give copied outputs
    else:
        raise BrickworkError(f"widen_residual: {where} ({type(stem).__name__}) is not a token, patch or flatten stem")


def _block_(block: nn.Module, m: int, where: str) -> None:
    if isinstance(block, (TransformerBlock, PostNormBlock)):
        _norm_(block.norm1, m, f"{where}.norm1")
        _branch_(block.attn, m, f"{where}.attn")
        _norm_(block.norm2, m, f"{where}.norm2")
        _branch_(block.ffn, m, f"{where}.ffn")
    elif isinstance(block, ResidualFFN):
        _norm_(block.norm, m, f"{where}.norm")
        _branch_(block.ffn, m, f"{where}.ffn")
    else:
        raise BrickworkError(f"widen_residual: {where} ({type(block).__name__}) is not a residual block")


def _branch_(branch: nn.Module, m: int, where: str) -> None:
    """A sublayer that reads the (normalised) stream and writes into it."""
    if isinstance(branch, ZeroBranch):
        return
    if isinstance(branch, FeedForward):
        for proj in (branch.up, branch.gate):
            if proj is not None:
                _reads(proj, m)
        _writes(branch.down, m)
    elif isinstance(branch, MultiHeadAttention):
        _attention_(branch, m)
    elif isinstance(branch, NestedAttention):
        _nested_attention_(branch, m)
    elif isinstance(branch, MoE):
        _moe_(branch, m, where)
    elif isinstance(branch, GatedExpert):
        _reads(branch.gate, m)
        _branch_(branch.expert, m, f"{where}.expert")
    elif isinstance(branch, OutputBias):
        resize(branch, {"bias": take(branch.bias, _map(branch.bias.shape[0], m), 0)})
    else:
        raise BrickworkError(f"widen_residual: cannot widen {where} ({type(branch).__name__})")


def _grow_heads(w: Tensor, shape: tuple[int, ...], e_axis: int, q: tuple[int, int] | None, m: int) -> Tensor:
    """Rows of a fused QKV tensor viewed as ``shape`` (with the head-width axis ``e_axis``): each
    head unit copied m times, the query rows (``q`` = (axis, index) of q in the q/k/v axis) scaled
    by 1 / sqrt(m) so that q . k over the wider head equals sqrt(m) q . k."""
    v = w.reshape(*shape, *w.shape[1:])
    e = shape[e_axis]
    v = take(v, _map(e, m), e_axis)
    if q is not None:
        axis, index = q
        v = v.clone()
        v.select(axis, index).mul_(m**-0.5)
    return v.reshape(-1, *w.shape[1:])


def _attention_(attn: MultiHeadAttention, m: int) -> None:
    """Rows ``[q | k | v]`` x heads x e; the output projection's columns heads x e."""
    d, h = attn.out.in_features, attn.heads
    e = d // h
    qkv_w = _grow_heads(attn.qkv.weight, (3, h, e), 2, (0, 0), m)
    tensors = {"weight": spread(qkv_w, _map(d, m), 1, d)}
    if attn.qkv.bias is not None:
        tensors["bias"] = _grow_heads(attn.qkv.bias, (3, h, e), 2, (0, 0), m)
    resize(attn.qkv, tensors, in_features=m * d, out_features=3 * m * d)
    out_w = attn.out.weight.reshape(d, h, e)
    out_w = spread(out_w, _map(e, m), 2, e).reshape(d, m * d)  # inner columns, divided among copies
    tensors = {"weight": take(out_w, _map(d, m), 0)}
    if attn.out.bias is not None:
        tensors["bias"] = take(attn.out.bias, _map(d, m), 0)
    resize(attn.out, tensors, in_features=m * d, out_features=m * d)


def _nested_attention_(attn: NestedAttention, m: int) -> None:
    """The head-major layout ``[h: q k v]`` of :class:`NestedAttention` (its heads nest; D does not)."""
    d, h, e = attn.dim, attn.heads, attn.head_dim
    qkv_w = _grow_heads(attn.qkv_weight, (h, 3, e), 2, (1, 0), m)
    tensors = {"qkv_weight": spread(qkv_w, _map(d, m), 1, d)}
    if attn.qkv_bias is not None:
        tensors["qkv_bias"] = _grow_heads(attn.qkv_bias, (h, 3, e), 2, (1, 0), m)
    out_w = spread(attn.out_weight.reshape(d, h, e), _map(e, m), 2, e).reshape(d, h * m * e)
    tensors["out_weight"] = take(out_w, _map(d, m), 0)
    if attn.out_bias is not None:
        tensors["out_bias"] = take(attn.out_bias, _map(d, m), 0)
    resize(attn, tensors, dim=m * d, head_dim=m * e)


def _moe_(moe: MoE, m: int, where: str) -> None:
    router = moe.router
    proj = getattr(router, "proj", None)
    if not isinstance(proj, nn.Linear) or any(
        p.dim() > 1 and not n.startswith(("proj.", "noise_proj.")) for n, p in router.named_parameters()
    ):
        raise BrickworkError(
            f"widen_residual: {where}.router ({type(router).__name__}) is not a linear scorer of the stream"
        )
    _reads(proj, m)
    if isinstance(noise := getattr(router, "noise_proj", None), nn.Linear):
        _reads(noise, m)
    bank = moe.experts
    if isinstance(bank, (GroupedFFNExperts, NeuronExperts)):
        d = bank.dim
        tensors = {"w_in": spread(bank.w_in, _map(d, m), 1, d), "w_out": take(bank.w_out, _map(d, m), 2)}
        if (b_out := tensor(bank, "b_out")) is not None:
            tensors["b_out"] = take(b_out, _map(d, m), 1)
        resize(bank, tensors, dim=m * d)
    elif isinstance(bank, ExpertList):
        for i, e in enumerate(bank):
            _branch_(e, m, f"{where}.experts.{i}")
    else:
        raise BrickworkError(f"widen_residual: {where}.experts ({type(bank).__name__}) is not a known expert bank")
    if moe.shared is not None:
        _branch_(moe.shared, m, f"{where}.shared")


def _head_(head: nn.Module, m: int, where: str) -> None:
    if not isinstance(head, ClassifierHead):
        raise BrickworkError(f"widen_residual: {where} ({type(head).__name__}) is not a classifier head")
    _norm_(head.norm, m, f"{where}.norm")
    _reads(head.proj, m)
