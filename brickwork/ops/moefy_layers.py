"""Layer importance and layer dropping for post-norm encoders (BERT, MiniLM), on top of :mod:`ops.chain`.

:func:`brickwork.ops.chain.layer_importance` scores a layer by ``1 - cos(input, output)``
(He et al., 2024, "What Matters in Transformers? Not All Attention Is Needed"); for whole
blocks it applies to any stack and is reused as it is. Two things differ for a post-norm
encoder whose bricks share a :class:`~brickwork.nn.PaddingMask`:

* its attention sublayer is ``norm1(h + attn(h))``, not the pre-norm ``h + attn(norm1(h))``
  that ``chain`` assumes; :func:`attention_importance` scores that sublayer, and
  :func:`drop_attention` removes all of it (attention and its norm: the sublayer becomes the
  identity, the change its score measured);
* whole blocks are dropped by :func:`brickwork.ops.chain.drop_layers`, which copies the model
  in one piece so the copies keep sharing the padding mask.

Scores need padding-free batches (:func:`brickwork.data.sentences.token_batches`): a padded
position would count as a token. Both drops return copies.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brickwork.nn.stack import StackModel
from brickwork.nn.transformer import PostNormBlock
from brickwork.ops.chain import ZeroBranch


@torch.no_grad()
def attention_importance(model: StackModel, batches: Iterable[Tensor]) -> list[float]:
    """``1 - mean cos(h, norm1(h + attn(h)))`` per post-norm block (NaN for other layers), token-weighted."""
    n = len(model.body)
    sums, tokens = torch.zeros(n, dtype=torch.float64), 0
    was = model.training
    model.eval()
    try:
        for x in batches:
            h = model.stem(x)
            for i, layer in enumerate(model.body.layers):
                if isinstance(layer, PostNormBlock):
                    out = layer.norm1(h + layer.attn(h))
                    cos = F.cosine_similarity(h.flatten(0, -2).double(), out.flatten(0, -2).double(), dim=-1)
                    sums[i] += float((1 - cos).sum())
                else:
                    sums[i] = float("nan")
                h = layer(h)
            tokens += h.shape[:-1].numel()
    finally:
        model.train(was)
    return (sums / max(tokens, 1)).tolist()


def drop_attention(model: StackModel, drop: Iterable[int]) -> StackModel:
    """A copy of ``model`` whose post-norm blocks ``drop`` lose their attention sublayer entirely
    (attention and ``norm1``): the block becomes ``norm2(h + ffn(h))``."""
    out = copy.deepcopy(model)
    for i in drop:
        layer = out.body.layers[i]
        if not isinstance(layer, PostNormBlock):
            raise ValueError(f"drop_attention: layer {i} is {type(layer).__name__}, not a PostNormBlock")
        layer.attn = ZeroBranch()
        layer.norm1 = nn.Identity()
    return out
