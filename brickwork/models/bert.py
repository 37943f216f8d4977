"""Any local Hugging Face BERT-family checkpoint, loaded into brickwork's bricks and saved back.

A folder in the Hugging Face layout (``config.json``, ``model.safetensors``, ``tokenizer.json``)
becomes a :class:`~brickwork.nn.StackModel`: :class:`~brickwork.nn.BertEmbed`, a
:class:`~brickwork.nn.Stack` of post-norm :class:`~brickwork.nn.PostNormBlock` layers (fused-QKV
:class:`~brickwork.nn.MultiHeadAttention`, :class:`~brickwork.nn.FeedForward`) and a masked
mean-pool head with L2 normalisation (the sentence-transformers pooling). ``config.json``'s
``model_type`` chooses the variant:

* ``bert`` (Devlin et al., 2019): absolute positions ``0 .. T-1``, token-type (segment) table,
  padding id 0 (all-MiniLM-L6-v2 is one: :func:`brickwork.models.minilm.minilm`);
* ``roberta`` (Liu et al., 2019): positions counted from ``pad_token_id + 1``, a one-row
  token-type table, padding id 1.

Only ``safetensors`` is read: a folder with only ``pytorch_model.bin`` is refused (loading it
means unpickling, which can run arbitrary code). Nothing is fetched from a hub. Task heads of
pre-training checkpoints (``cls.*``, ``lm_head.*``) are ignored; the pooler (``pooler.dense``,
unused by mean pooling) is kept only to be written back by :func:`save_bert`; any other key
that is missing or unknown is refused with the file and the keys expected.

:func:`save_bert` writes a dense brickwork BERT (after e.g. a merge or dropped layers) back to
the layout it came from, which ``transformers``' ``BertModel`` / ``RobertaModel`` load. A
MoEfied model has no such form (its FFNs are mixtures of experts) and is refused.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from brickwork.data.tokenizer import Tokenizer
from brickwork.errors import CheckpointError
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
from brickwork.nn.ffn import Activation
from brickwork.registry import register

#: ``config.json`` ``model_type`` values this loader reads.
MODEL_TYPES = ("bert", "roberta")
#: Hugging Face ``hidden_act`` names with an exact brickwork activation.
HF_ACTIVATIONS: dict[str, Activation] = {"gelu": "gelu", "relu": "relu", "silu": "silu", "swish": "silu"}
#: Top-level key prefixes of task heads in pre-training / fine-tuning checkpoints: not read.
HEAD_PREFIXES = ("cls.", "lm_head.", "classifier.", "qa_outputs.")
#: Keys read but not part of the encoder: buffers, and the pooler (kept for :func:`save_bert`).
EXTRA_KEYS = ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias")
#: Per-layer Hugging Face names, relative to ``encoder.layer.{i}.``.
LAYER_KEYS = tuple(
    f"{name}.{kind}"
    for name in (
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "attention.output.LayerNorm",
        "intermediate.dense",
        "output.dense",
        "output.LayerNorm",
    )
    for kind in ("weight", "bias")
)
EMBED_KEYS = (
    "embeddings.word_embeddings.weight",
    "embeddings.position_embeddings.weight",
    "embeddings.token_type_embeddings.weight",
    "embeddings.LayerNorm.weight",
    "embeddings.LayerNorm.bias",
)


@dataclass(frozen=True)
class BertConfig:
    """What brickwork reads from a Hugging Face BERT-family ``config.json``."""

    model_type: str
    vocab_size: int
    dim: int
    depth: int
    heads: int
    hidden: int
    max_len: int
    type_vocab: int
    pad_id: int
    eps: float
    act: Activation
    raw: dict[str, Any]

    @property
    def roberta(self) -> bool:
        """Positions counted from ``pad_id + 1`` (RoBERTa) instead of from 0 (BERT)."""
        return self.model_type == "roberta"


def check_bert_folder(folder: str | Path) -> Path:
    """``folder`` as a Path once it holds ``config.json``, ``model.safetensors`` and ``tokenizer.json``.

    Raises:
        CheckpointError: a file is missing, or only pickled weights (``pytorch_model.bin``) exist.
    """
    path = Path(folder)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder (expected a Hugging Face model folder with config.json)")
    if not (path / "model.safetensors").is_file() and (path / "pytorch_model.bin").is_file():
        raise CheckpointError(
            f"{path}: only pytorch_model.bin found; brickwork reads model.safetensors only (a .bin is a "
            "pickle, and unpickling runs code): convert it once with save_pretrained(safe_serialization=True)"
        )
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (path / name).is_file():
            raise CheckpointError(
                f"{path}: no {name} (a BERT folder needs config.json, model.safetensors, tokenizer.json)"
            )
    return path


def read_bert_config(folder: str | Path) -> BertConfig:
    """The encoder's sizes and variant from ``folder/config.json``.

    Raises:
        CheckpointError: unreadable, a ``model_type`` other than bert / roberta, or an
            architecture option brickwork's bricks do not compute (named in the message).
    """
    path = Path(folder) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable JSON config ({e})") from None
    kind = raw.get("model_type")
    if kind not in MODEL_TYPES:
        raise CheckpointError(f"{path}: model_type {kind!r} is not supported (expected one of {list(MODEL_TYPES)})")
    positions = raw.get("position_embedding_type", "absolute")
    if positions != "absolute":
        raise CheckpointError(f"{path}: position_embedding_type {positions!r} is not supported (expected 'absolute')")
    act = raw.get("hidden_act", "gelu")
    if act not in HF_ACTIVATIONS:
        raise CheckpointError(f"{path}: hidden_act {act!r} is not supported (expected one of {sorted(HF_ACTIVATIONS)})")
    try:
        return BertConfig(
            model_type=kind,
            vocab_size=int(raw["vocab_size"]),
            dim=int(raw["hidden_size"]),
            depth=int(raw["num_hidden_layers"]),
            heads=int(raw["num_attention_heads"]),
            hidden=int(raw["intermediate_size"]),
            max_len=int(raw["max_position_embeddings"]),
            type_vocab=int(raw.get("type_vocab_size", 2)),
            pad_id=int(raw.get("pad_token_id", 1 if kind == "roberta" else 0)),
            eps=float(raw.get("layer_norm_eps", 1e-12)),
            act=HF_ACTIVATIONS[act],
            raw=raw,
        )
    except KeyError as e:
        raise CheckpointError(
            f"{path}: no {e.args[0]!r} (a BERT config needs hidden_size, num_hidden_layers, ...)"
        ) from None


def bert_encoder(
    vocab_size: int = 30522,
    dim: int = 384,
    depth: int = 6,
    heads: int = 12,
    hidden: int = 1536,
    max_len: int = 512,
    dropout: float = 0.0,
    eps: float = 1e-12,
    type_vocab: int = 2,
    pad_id: int = 0,
    roberta_positions: bool = False,
    act: Activation = "gelu",
) -> StackModel:
    """A BERT encoder with mean-pooled, L2-normalised output, from bricks.

    Shapes:
        (B, T) int64 token ids (``pad_id`` = padding) -> (B, D) unit-norm sentence embeddings
    """
    padding = PaddingMask()
    blocks = [
        PostNormBlock(
            dim,
            MultiHeadAttention(dim, heads, dropout=dropout, padding=padding),
            FeedForward(dim, hidden, act=act, dropout=dropout),
            dropout=dropout,
            eps=eps,
        )
        for _ in range(depth)
    ]
    stem = BertEmbed(
        vocab_size,
        dim,
        max_len,
        type_vocab=type_vocab,
        pad_id=pad_id,
        eps=eps,
        padding=padding,
        roberta_positions=roberta_positions,
    )
    return StackModel(stem, Stack(blocks), MeanPoolHead(padding, normalize=True))


def convert_bert_state(hf: Mapping[str, Tensor], depth: int) -> dict[str, Tensor]:
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


def expected_keys(depth: int) -> list[str]:
    """The encoder keys of a ``depth``-layer Hugging Face BERT / RoBERTa checkpoint."""
    return [*EMBED_KEYS, *(f"encoder.layer.{i}.{k}" for i in range(depth) for k in LAYER_KEYS)]


def _encoder_state(hf: Mapping[str, Tensor], cfg: BertConfig, where: Path) -> dict[str, Tensor]:
    """The encoder's tensors under their ``BertModel`` names (a ``bert.`` / ``roberta.`` prefix
    of task checkpoints stripped, task heads dropped), every expected key present, none unknown."""
    prefix = f"{cfg.model_type}."
    has_prefix = any(k.startswith(prefix) for k in hf)
    state: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in hf.items():
        if has_prefix and key.startswith(prefix):
            state[key[len(prefix) :]] = value
        elif key.startswith(HEAD_PREFIXES):
            continue
        elif has_prefix:
            unknown.append(key)
        else:
            state[key] = value
    expected = expected_keys(cfg.depth)
    unknown += [k for k in state if k not in expected and k not in EXTRA_KEYS]
    missing = [k for k in expected if k not in state]
    layers = f"encoder.layer.{{0..{cfg.depth - 1}}}.{{attention.self.{{query,key,value}},attention.output.dense,..."
    pattern = f"expected {', '.join(EMBED_KEYS[:2])}, ..., {layers}}}.{{weight,bias}}"
    if missing:
        raise CheckpointError(f"{where}: missing key {missing[0]!r} ({len(missing)} missing; {pattern})")
    if unknown:
        raise CheckpointError(f"{where}: unknown key {unknown[0]!r} ({len(unknown)} unknown; {pattern})")
    return state


def load_bert(folder: str | Path, dropout: float = 0.0) -> StackModel:
    """The BERT-family encoder in ``folder`` (Hugging Face layout), weights loaded, in eval mode.

    Args:
        folder: holds ``config.json``, ``model.safetensors`` and ``tokenizer.json``.
        dropout: attention, residual-branch and FFN dropout when the model is trained further
            (0 at inference, as transformers' ``eval()``).

    Raises:
        CheckpointError: see :func:`check_bert_folder`, :func:`read_bert_config`; a missing or
            unknown weight; a tensor whose shape the config does not give.
    """
    path = check_bert_folder(folder)
    cfg = read_bert_config(path)
    model = bert_encoder(
        vocab_size=cfg.vocab_size,
        dim=cfg.dim,
        depth=cfg.depth,
        heads=cfg.heads,
        hidden=cfg.hidden,
        max_len=cfg.max_len,
        dropout=dropout,
        eps=cfg.eps,
        type_vocab=cfg.type_vocab,
        pad_id=cfg.pad_id,
        roberta_positions=cfg.roberta,
        act=cfg.act,
    )
    weights = path / "model.safetensors"
    try:
        hf = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error type for a corrupt header
        raise CheckpointError(f"{weights}: not a readable safetensors file ({e})") from None
    state = convert_bert_state(_encoder_state(hf, cfg, weights), cfg.depth)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
        raise CheckpointError(f"{weights}: tensor shapes do not match {path / 'config.json'}: {first}") from None
    return model.eval()


@register("model", "bert")
def bert(path: str, dropout: float = 0.0) -> StackModel:
    """A local Hugging Face BERT / RoBERTa folder (config.json, model.safetensors, tokenizer.json), offline."""
    return load_bert(path, dropout)


def bert_tokenizer(folder: str | Path, max_len: int = 256) -> Tokenizer:
    """The tokenizer of the BERT folder (its ``tokenizer.json``), padding with the config's
    ``pad_token_id`` and truncating to ``max_len`` or to what the position table covers."""
    path = check_bert_folder(folder)
    cfg = read_bert_config(path)
    positions = cfg.max_len - (cfg.pad_id + 1 if cfg.roberta else 0)  # RoBERTa's first rows are not positions
    return Tokenizer(min(max_len, positions), folder=path, pad_id=cfg.pad_id)


def encoder_tokenizer(name: str, args: Mapping[str, Any], max_len: int, where: str = "model.path") -> Tokenizer:
    """The tokenizer of the registered text encoder ``name`` (``args`` its spec's arguments):
    a ``bert`` folder's own, MiniLM's for ``minilm-l6``.

    Raises:
        CheckpointError: a ``bert`` folder that pads with an id other than 0 (RoBERTa): the
            sentence pipelines (``input_batches(padded=True)``, the data sets) strip 0-padding.
    """
    if name != "bert":
        return Tokenizer(max_len)
    tok = bert_tokenizer(args["path"], max_len)
    if tok.pad_id != 0:
        raise CheckpointError(
            f"{where}: {args['path']} pads with id {tok.pad_id}; brickwork's sentence pipelines "
            "(moefy_study, sentence data) expect padding id 0 (BERT-style); load it with load_bert in Python"
        )
    return tok


def _layer_state(block: nn.Module, i: int) -> dict[str, Tensor]:
    """One body layer's tensors under Hugging Face names; refuses what ``BertLayer`` cannot hold."""
    where = f"body.layers.{i}"
    if not isinstance(block, PostNormBlock):
        raise CheckpointError(f"{where}: a {type(block).__name__} is not a BERT layer (expected PostNormBlock)")
    attn, ffn = block.attn, block.ffn
    if not isinstance(attn, MultiHeadAttention) or not isinstance(block.norm1, nn.LayerNorm):
        raise CheckpointError(f"{where}.attn: {type(attn).__name__}; a BertLayer needs its attention (not dropped)")
    if not isinstance(ffn, FeedForward) or ffn.gate is not None:
        raise CheckpointError(
            f"{where}.ffn: a {type(ffn).__name__} cannot be a BertModel FFN (a MoEfied model cannot be a "
            "BertModel: its FFNs are mixtures of experts; save it with brickwork's checkpoint instead)"
        )
    src = f"encoder.layer.{i}."
    out: dict[str, Tensor] = {}
    for kind in ("weight", "bias"):
        q, k, v = getattr(attn.qkv, kind).chunk(3, dim=0)
        out |= {src + f"attention.self.query.{kind}": q, src + f"attention.self.key.{kind}": k}
        out[src + f"attention.self.value.{kind}"] = v
        out[src + f"attention.output.dense.{kind}"] = getattr(attn.out, kind)
        out[src + f"attention.output.LayerNorm.{kind}"] = getattr(block.norm1, kind)
        out[src + f"intermediate.dense.{kind}"] = getattr(ffn.up, kind)
        out[src + f"output.dense.{kind}"] = getattr(ffn.down, kind)
        out[src + f"output.LayerNorm.{kind}"] = getattr(block.norm2, kind)
    return out


def bert_hf_state(model: nn.Module) -> dict[str, Tensor]:
    """``model``'s weights under ``BertModel`` / ``RobertaModel`` names (the inverse of loading).

    Raises:
        CheckpointError: ``model`` is not a dense post-norm BERT built by :func:`bert_encoder`
            (a MoEfied FFN, a dropped attention sublayer, another stem); every FFN must have
            the same width (``intermediate_size`` is one number in the config).
    """
    if not isinstance(model, StackModel) or not isinstance(model.stem, BertEmbed):
        raise CheckpointError(
            f"{type(model).__name__}: not a BERT encoder (expected a StackModel with a BertEmbed stem)"
        )
    e = model.stem
    out = {
        "embeddings.word_embeddings.weight": e.word.weight,
        "embeddings.position_embeddings.weight": e.position.weight,
        "embeddings.token_type_embeddings.weight": e.token_type.weight,
        "embeddings.LayerNorm.weight": e.norm.weight,
        "embeddings.LayerNorm.bias": e.norm.bias,
    }
    widths = set()
    for i, block in enumerate(model.body.layers):
        out |= _layer_state(block, i)
        widths.add(out[f"encoder.layer.{i}.intermediate.dense.weight"].shape[0])
    if len(widths) > 1:
        raise CheckpointError(
            f"body: FFN widths {sorted(widths)} differ by layer; a BertModel has one intermediate_size"
        )
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def save_bert(model: nn.Module, out: str | Path, source: str | Path) -> Path:
    """Write ``model`` to the new folder ``out`` in the Hugging Face layout of ``source``.

    ``config.json`` is ``source``'s with the sizes the model now has (layers, FFN width,
    heads); ``tokenizer.json`` (and the other tokenizer files) are copied; the pooler weights,
    which brickwork's mean pooling does not use, are copied from ``source`` when it has them.

    Returns:
        ``out``.

    Raises:
        CheckpointError: ``out`` exists, ``source`` is not a BERT folder, or ``model`` has no
            BertModel form (see :func:`bert_hf_state`).
    """
    dst, src = Path(out), check_bert_folder(source)
    if dst.exists():
        raise CheckpointError(f"{dst} exists; choose another folder (brickwork never overwrites one)")
    cfg = read_bert_config(src)
    state = bert_hf_state(model)
    depth = len(model.body.layers)  # type: ignore[union-attr, arg-type]  # a StackModel: bert_hf_state checked
    hidden = state["encoder.layer.0.intermediate.dense.weight"].shape[0] if depth else cfg.hidden
    heads = model.body.layers[0].attn.heads if depth else cfg.heads  # type: ignore[index, union-attr]
    with safe_open(str(src / "model.safetensors"), "pt") as f:  # the pooler only, not the whole file
        state |= {
            f"pooler.dense.{k.rsplit('.', 1)[1]}": f.get_tensor(k) for k in f.keys() if k.endswith(EXTRA_KEYS[1:])
        }
    raw = {**cfg.raw, "num_hidden_layers": depth, "intermediate_size": int(hidden), "num_attention_heads": int(heads)}
    dst.mkdir(parents=True)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    return dst
