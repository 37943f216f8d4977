"""The user's own text: a folder of ``.txt`` files (language modelling) and JSONL sentences.

``txt``: every ``*.txt`` file directly in the folder ``path``, read as UTF-8 (a byte-order mark
is dropped), in sorted file-name order, joined into one text with a line break between two files
where the first does not already end with one. Other files and sub-folders are ignored. The text
then follows exactly the rules of the built-in ``hamlet`` corpus (:func:`brickwork.data.text.
char_lm_dataset`): contiguous train / val / test regions, non-overlapping windows of
``seq_len + 1`` ids, ``y`` one id ahead of ``x``, ``seed`` shuffling only the training windows.
``tokens: char`` makes the ids characters (vocabulary: the sorted distinct characters, recorded
in ``preprocess``); ``tokens: minilm`` makes them MiniLM WordPiece tokens (vocabulary: MiniLM's
30,522 tokens, lower-cased, no [CLS] / [SEP]).

``jsonl``: one JSON object per line, ``{"text": "...", "label": ...}``, blank lines skipped; the
labels are all integers or all strings. They become class ids in sorted order as for ``npz`` /
``csv`` (:func:`brickwork.data.files.encode_labels`); the sentences become MiniLM WordPiece ids
exactly as the built-in ``rotten-tomatoes`` set does (:func:`brickwork.data.sentences.
tokenised_classification`), for the ``sentence_classifier`` model and the MiniLM stages.

Every malformed file is one :class:`~brickwork.errors.DataError` line naming the file (and the
line), what is wrong and what was expected.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np

from brickwork.data.base import Dataset, Fraction, check_fractions
from brickwork.data.files import check_classes, check_file, encode_labels
from brickwork.data.sentences import Limit, MaxLen, tokenised_classification
from brickwork.data.text import SeqLen, char_lm_dataset, encode
from brickwork.data.tokenizer import wordpiece_stream
from brickwork.errors import DataError
from brickwork.registry import register

Tokens = Literal["char", "minilm"]
JSONL_HINT = 'one JSON object per line, {"text": "a sentence", "label": 1} (labels all integers or all strings)'


def _utf8(raw: bytes, where: str, what: str) -> str:
    """``raw`` decoded as UTF-8 (a leading byte-order mark dropped), or a DataError with the line."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{where}: line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); expected {what}"
        ) from None


# ---------------------------------------------------------------------------------- txt


def read_txt_folder(path: str) -> tuple[str, list[Path]]:
    """The text of the folder's ``*.txt`` files (sorted by name, joined) and the files read.

    Raises:
        DataError: the path is not a folder, holds no ``.txt`` file, one is not UTF-8, or all are empty.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DataError(f"{path}: not a folder; expected a folder of UTF-8 .txt files for dataset 'txt'")
    files = sorted((p for p in folder.iterdir() if p.suffix == ".txt" and p.is_file()), key=lambda p: p.name)
    if not files:
        raise DataError(f"{path}: no .txt files in this folder; expected UTF-8 text files named *.txt")
    parts: list[str] = []
    for f in files:
        part = _utf8(f.read_bytes(), str(f), "UTF-8 text in every .txt file")
        if parts and parts[-1] and not parts[-1].endswith("\n"):
            parts.append("\n")
        parts.append(part)
    text = "".join(parts)
    if not text.strip():
        raise DataError(f"{path}: the {len(files)} .txt file(s) hold no text; expected some text to model")
    return text, files


@register("dataset", "txt", injected=("seed",))
def txt(
    *,
    path: str,
    tokens: Tokens = "char",
    seq_len: SeqLen = 64,
    val_fraction: Fraction = 0.1,
    test_fraction: Fraction = 0.1,
    seed: int,
) -> Dataset:
    """Your own language-modelling text: a folder of UTF-8 ``.txt`` files, in sorted name order.

    Args:
        path: the folder (relative to the current directory).
        tokens: ``char`` (character ids) or ``minilm`` (MiniLM WordPiece ids).
        seq_len: ids per training sequence T.
        val_fraction: share of the text (after train) used for validation.
        test_fraction: share of the text (at the end) used for testing.
        seed: shuffles the order of the training windows only.

    Returns:
        An ``lm`` dataset: x, y int64 (N, T), y one id ahead of x; the vocabulary in ``classes``.
    """
    check_fractions(val_fraction, test_fraction)
    text, files = read_txt_folder(path)
    if tokens == "char":
        ids, vocab = encode(text)
        preprocess: dict[str, Any] = {"tokens": "char", "vocab": "".join(vocab), "files": [f.name for f in files]}
        unit = "characters"
    else:
        ids, vocab = wordpiece_stream(text)
        preprocess = {"tokens": "minilm", "files": [f.name for f in files]}
        unit = "MiniLM tokens"
    return char_lm_dataset(
        path,
        ids,
        vocab,
        str(Path(path).expanduser().resolve()),
        seq_len=seq_len,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
        unit=unit,
        preprocess=preprocess,
    )


# -------------------------------------------------------------------------------- jsonl


def _kind(value: Any) -> str:
    """How a JSON value reads in an error message."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number with a fraction"
    if isinstance(value, str):
        return "a string"
    return "null" if value is None else f"a JSON {'list' if isinstance(value, list) else 'object'}"


def read_jsonl(path: str) -> tuple[list[str], np.ndarray]:
    """Sentences and raw labels (N,) (int64 or text) of a JSONL file of ``text`` / ``label`` objects.

    Raises:
        DataError: missing / empty / non-UTF-8 file, a line that is not a JSON object, a missing
            or mistyped ``text`` / ``label``, labels of two types; the message names the line.
    """
    p = check_file(path)
    content = _utf8(p.read_bytes(), path, "a UTF-8 JSONL file")
    texts: list[str] = []
    labels: list[int | str] = []
    first: tuple[int, str] | None = None  # the line of the first label and its type
    # Lines end at "\n" only: str.splitlines would also cut at U+2028 and the like, which JSON strings may hold.
    for n, line in enumerate(content.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            where = f"{path}: line {n}: not JSON ({e.msg} at column {e.colno})"
            raise DataError(f"{where}; expected {JSONL_HINT}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}: line {n}: {_kind(obj)}, not a JSON object; expected {JSONL_HINT}")
        for key in ("text", "label"):
            if key not in obj:
                has = ", ".join(repr(k) for k in obj) or "no keys"
                raise DataError(f"{path}: line {n}: no {key!r} key (the object has {has}); expected {JSONL_HINT}")
        text, label = obj["text"], obj["label"]
        if not isinstance(text, str) or not text.strip():
            what = "an empty string" if isinstance(text, str) else _kind(text)
            raise DataError(f"{path}: line {n}: 'text' is {what}; expected the sentence as a non-empty string")
        if isinstance(label, bool) or not isinstance(label, (int, str)) or (isinstance(label, str) and not label):
            what = "an empty string" if label == "" else _kind(label)
            raise DataError(f"{path}: line {n}: 'label' is {what}; expected an integer or a non-empty string")
        if first is None:
            first = (n, _kind(label))
        elif _kind(label) != first[1]:
            raise DataError(
                f"{path}: line {n}: 'label' is {_kind(label)} but line {first[0]}'s is {first[1]}; "
                "expected every label of one type (all integers or all strings)"
            )
        texts.append(text.strip())
        labels.append(label)
    if not texts:
        raise DataError(f"{path}: no JSON lines, only blank ones; expected {JSONL_HINT}")
    if isinstance(labels[0], int):
        return texts, _int64_labels(path, labels)
    return texts, np.array(labels, dtype=str)


def _int64_labels(path: str, labels: list[Any]) -> np.ndarray:
    for i, v in enumerate(labels):
        if not -(2**63) <= v < 2**63:
            raise DataError(
                f"{path}: label {v} (sample {i}) is beyond int64's range; expected smaller integers, or text"
            )
    return np.array(labels, dtype=np.int64)


@register("dataset", "jsonl", injected=("seed",))
def jsonl(
    *,
    path: str,
    max_len: MaxLen = 64,
    limit: Limit | None = None,
    val_fraction: Fraction = 0.1,
    test_fraction: Fraction = 0.2,
    seed: int,
) -> Dataset:
    """Your own sentence classification data: JSONL lines ``{"text": ..., "label": ...}``.

    Tokenised with MiniLM's WordPiece tokenizer, as ``rotten-tomatoes`` is.

    Args:
        path: the .jsonl file (relative to the current directory).
        max_len: tokens per sentence including [CLS] and [SEP] (longer ones are truncated).
        limit: use only the first ``limit`` sentences of a seeded shuffle (quick runs).
        val_fraction: share of the sentences for validation.
        test_fraction: share of the sentences for testing.
        seed: seeds the shuffle and the split.

    Returns:
        A ``classify`` dataset: x (N, max_len) int64 ids padded with 0, y (N,) class ids 0..K-1
        in sorted label order (the original labels in ``classes``).

    Raises:
        DataError: a malformed file (:func:`read_jsonl`), one class only, or too few lines to give
            every split asked for (fraction > 0) at least one sentence.
    """
    check_fractions(val_fraction, test_fraction)
    texts, raw = read_jsonl(path)
    ids, classes = encode_labels(raw, path, "label")
    check_classes(classes, path, "'label'")
    n = min(len(texts), limit) if limit is not None else len(texts)
    sizes = {"test": int(round(n * test_fraction)), "val": int(round(n * val_fraction))}
    sizes["train"] = n - sizes["test"] - sizes["val"]
    fractions = {"train": 1.0, "val": val_fraction, "test": test_fraction}
    for part, size in sizes.items():
        if size == 0 and fractions[part] > 0:
            raise DataError(
                f"{path}: {n} line(s) are too few for the splits: the {part} split gets none; expected "
                f"enough lines for one sentence in each split (add lines or set {part}_fraction: 0)"
                if part != "train"
                else f"{path}: {n} line(s) leave none for training after val and test; expected more lines"
            )
    return tokenised_classification(
        path,
        texts,
        ids.tolist(),
        classes,
        str(Path(path).expanduser().resolve()),
        max_len=max_len,
        limit=limit,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
        preprocess={"labels": classes, "tokens": "minilm"},
    )
