"""The user's own classification data: ``npz`` and ``csv`` files.

``npz``: an archive written by ``numpy.savez(path, x=..., y=...)``, read with
``allow_pickle=False`` (a data file never executes code). ``x`` (N, ...) becomes float32
of the same shape, so ``in_shape = x.shape[1:]``.

``csv``: a header row naming the columns, then one sample per row. The column named by
``label`` holds the class; every other column is a float feature, so x is float32 (N, F).

Labels become int64 class ids 0..K-1 in the order of the sorted distinct labels (numbers
sorted as numbers, text as text), whatever values the file uses; ``classes`` keeps the
original labels as strings (and in ``preprocess["labels"]``, recorded in every checkpoint).
A file whose labels take a single value is refused (there is nothing to classify). Splits are
seeded random splits, like the built-in datasets.

``x`` is used as stored unless ``scale:`` says otherwise (``standard`` or ``minmax``, statistics
from the training split only: :mod:`brickwork.data.scaling`). ``docs/data.md`` is the contract.

Pre-flight: both loaders take the file as an argument named ``path`` (relative paths
resolve against the current directory). The config layer checks, before any work starts,
that every dataset argument named ``path`` is an existing file; :func:`check_file` is that
check, with this module's error message, for it to call.
"""

from __future__ import annotations

import csv as _csv
import zipfile
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from brickwork.data.base import Dataset, Fraction, Split, check_fractions, split_indices
from brickwork.data.scaling import Scale, apply_scaling, fit_scaling
from brickwork.errors import DataError, close_matches
from brickwork.registry import register

_FLOAT32_MAX = float(np.finfo(np.float32).max)
NPZ_HINT = "an .npz archive with arrays x (N, ...) and y (N,), e.g. numpy.savez(path, x=x, y=y)"


def check_file(path: str) -> Path:
    """The resolved path of an existing, non-empty data file.

    Raises:
        DataError: the path does not exist, is a folder, or is empty.
    """
    p = Path(path).expanduser()
    shown = f"{path!s}" if p.is_absolute() else f"{path!s} (resolved against {Path.cwd()})"
    if not p.exists():
        raise DataError(f"data file not found: {shown}; a relative path resolves against the current directory")
    if not p.is_file():
        raise DataError(f"data path is not a file: {shown}")
    if p.stat().st_size == 0:
        raise DataError(f"data file is empty: {shown}")
    return p


def _index(flat: int, shape: tuple[int, ...]) -> str:
    """``flat`` as the index ``[i, j, ...]`` of an array of ``shape``, for error messages."""
    return "[" + ", ".join(str(int(i)) for i in np.unravel_index(flat, shape)) + "]"


def to_float32(x: np.ndarray, where: str, name: str = "x") -> np.ndarray:
    """``x`` cast to float32, refused if any value is NaN or infinite *after* the cast.

    The check follows the cast because a float64 like ``1e300`` is finite but becomes
    ``inf`` in float32, which a model would then train on.

    Raises:
        DataError: naming ``where``, the array and the first bad index.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        cast = np.ascontiguousarray(x, dtype=np.float32)
    bad = ~np.isfinite(cast)
    if bad.any():
        flat = int(np.flatnonzero(bad)[0])
        value = x.reshape(-1)[flat].item()
        raise DataError(
            f"{where}: {name}{_index(flat, x.shape)} = {value!r} is NaN, infinite or beyond float32's range "
            f"(|x| <= {_FLOAT32_MAX:.3g}); expected finite numbers"
        )
    return cast


# Floats in [-2**63, 2**63) are exactly the integral floats that int64 holds; 2**63 itself does not fit.
_INT64_LIMIT = float(2**63)


def encode_labels(labels: np.ndarray, where: str, name: str = "y") -> tuple[np.ndarray, list[str]]:
    """Map arbitrary class labels (N,) to int64 ids 0..K-1 in sorted order.

    Args:
        labels: integers, integral floats, booleans or strings.
        where: the file named in errors.
        name: the array (or column) named in errors.

    Returns:
        ids int64 (N,) and the K distinct labels as strings, in id order.

    Raises:
        DataError: labels are fractional or non-finite numbers, not exactly representable as
            int64 (distinct labels would merge in the cast), or of another kind; the message
            names the first bad index.
    """
    if labels.dtype.kind == "f":
        checks = (
            (~np.isfinite(labels), "labels contain NaN or infinity"),
            (labels != np.round(labels), "labels are fractional numbers"),
            ((labels < -_INT64_LIMIT) | (labels >= _INT64_LIMIT), "labels are beyond int64's range (they would merge)"),
        )
        for bad, what in checks:
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise DataError(
                    f"{where}: {what}, first at {name}[{i}] = {labels[i].item()!r}; expected class labels "
                    "(integers exactly representable as int64, or text)"
                )
        labels = labels.astype(np.int64)
    if labels.dtype.kind not in "biuUS":
        raise DataError(f"{where}: {name} has dtype {labels.dtype}; expected integers or strings")
    values, ids = np.unique(labels, return_inverse=True)
    return ids.astype(np.int64).reshape(-1), [str(v) for v in values.tolist()]


def check_classes(classes: list[str], where: str, name: str = "y") -> None:
    """Raise :class:`DataError` unless there are at least two classes to tell apart."""
    if len(classes) < 2:
        raise DataError(f"{where}: {name} holds one class only ({classes[0]!r}); expected at least two classes")


def _dataset(
    path: str,
    x: np.ndarray,
    y: np.ndarray,
    where: str,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    scale: Scale = "none",
    name: str = "y",
) -> Dataset:
    """Seeded split of features ``x`` (N, ...) and raw labels ``y`` (N,) into a Dataset.

    ``scale``'s statistics come from the training split and are applied to all three splits.
    """
    check_fractions(val_fraction, test_fraction)
    xt = torch.from_numpy(to_float32(x, where))
    ids, classes = encode_labels(y, where)
    check_classes(classes, where, name)
    yt = torch.from_numpy(ids)
    tr, va, te = split_indices(len(xt), val_fraction, test_fraction, seed)
    if len(tr) == 0:
        raise DataError(f"{where}: {len(xt)} samples leave none for training after val and test")
    scaling = fit_scaling(xt[tr], scale)
    splits = [Split(apply_scaling(xt[i], scaling), yt[i]) for i in (tr, va, te)]
    preprocess: dict[str, object] = {"labels": classes}
    if scaling is not None:
        for split in splits:
            to_float32(split.x.numpy(), f"{where} (after scale: {scale})")  # a tiny spread can overflow float32
        preprocess["scale"] = scaling.to_dict()
    return Dataset(
        name=path,
        task="classify",
        train=splits[0],
        val=splits[1],
        test=splits[2],
        in_shape=tuple(xt.shape[1:]),
        num_classes=len(classes),
        classes=classes,
        source=str(Path(path).expanduser().resolve()),
        preprocess=preprocess,
    )


# -------------------------------------------------------------------------------- npz


def read_npz(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Arrays ``x`` (N, ...) and ``y`` (N,) of an npz file, checked; never unpickles.

    Raises:
        DataError: missing file, not an npz archive, missing or malformed arrays.
    """
    p = check_file(path)
    with open(p, "rb") as f:
        magic = f.read(6)
    if magic == b"\x93NUMPY":
        raise DataError(f"{path}: is a single-array .npy file; expected {NPZ_HINT}")
    if not magic.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        raise DataError(f"{path}: not an .npz archive (it does not start with the zip signature); expected {NPZ_HINT}")
    try:
        archive = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: not a readable .npz archive ({e}); expected {NPZ_HINT}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: not an .npz archive; expected {NPZ_HINT}")
    with archive:
        names = sorted(archive.files)
        missing = [k for k in ("x", "y") if k not in names]
        if missing:
            raise DataError(
                f"{path}: missing array(s) {', '.join(missing)}; the file has "
                f"{', '.join(names) if names else 'no arrays'}; expected {NPZ_HINT}"
            )
        try:
            x, y = archive["x"], archive["y"]
        except (ValueError, OSError, zipfile.BadZipFile) as e:
            # Object arrays need pickle, which is refused; or the archive member is corrupt.
            raise DataError(f"{path}: cannot read arrays x/y ({e}); expected plain numeric arrays") from None
    if x.dtype.kind not in "biuf":
        raise DataError(f"{path}: x has dtype {x.dtype}; expected numbers")
    if x.ndim < 2:
        raise DataError(
            f"{path}: x has shape {x.shape}; expected (N, ...) with at least one feature "
            "dimension, e.g. (N, 1) for a single feature"
        )
    if y.ndim != 1:
        raise DataError(f"{path}: y has shape {y.shape}; expected (N,) class labels")
    if len(x) != len(y):
        raise DataError(f"{path}: x has {len(x)} samples but y has {len(y)}; expected equal lengths")
    if len(x) == 0:
        raise DataError(f"{path}: x and y hold no samples")
    return x, y


@register("dataset", "npz", injected=("seed",))
def npz(
    *,
    path: str,
    scale: Scale = "none",
    val_fraction: Fraction = 0.1,
    test_fraction: Fraction = 0.2,
    seed: int,
) -> Dataset:
    """Your own classification data from an .npz file with arrays x and y.

    Args:
        path: the .npz file (relative to the current directory).
        scale: ``none`` (x as stored), ``standard`` or ``minmax`` (training-split statistics).
        val_fraction: share of the samples held out for validation.
        test_fraction: share of the samples held out for testing.
        seed: seeds the random split.

    Returns:
        x float32 (N, ...) as stored (or scaled); y int64 (N,) class ids 0..K-1.
    """
    x, y = read_npz(path)
    return _dataset(path, x, y, path, val_fraction, test_fraction, seed, scale)


# -------------------------------------------------------------------------------- csv


def read_csv(path: str, label: str, delimiter: str = ",") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Features float32 (N, F), raw labels (N,) and feature names of a headed CSV file.

    Blank lines are skipped. Labels are integers when every label parses as one, else text.

    Raises:
        DataError: missing/empty file, no label column, ragged rows, non-numeric features.
    """
    p = check_file(path)
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:
            reader, rows, line = _csv.reader(f, delimiter=delimiter), [], 1
            for row in reader:  # keep the file line each row starts on, for error messages
                if row:  # skip blank lines
                    rows.append((row, line))
                line = reader.line_num + 1
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e}); expected a CSV file") from None
    except _csv.Error as e:
        raise DataError(f"{path}: malformed CSV ({e})") from None
    if not rows:
        raise DataError(f"{path}: no header row; expected a CSV with a header naming the columns")
    header = [h.strip() for h in rows[0][0]]
    if label not in header:
        close = close_matches(label, header)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise DataError(f"{path}: no label column {label!r}; the header has {', '.join(map(repr, header))}{hint}")
    if len(rows) == 1:
        raise DataError(f"{path}: has a header but no data rows")
    li = header.index(label)
    features = [i for i in range(len(header)) if i != li]
    x = np.empty((len(rows) - 1, len(features)), dtype=np.float32)
    labels = []
    for n, (row, line) in enumerate(rows[1:]):
        if len(row) != len(header):
            raise DataError(f"{path}: line {line} has {len(row)} field(s); expected {len(header)}, as in the header")
        labels.append(row[li].strip())
        if not labels[-1]:
            raise DataError(f"{path}: line {line}, column {label!r}: the label is empty")
        for j, i in enumerate(features):
            cell = row[i].strip()
            try:
                value = float(cell)
            except ValueError:
                raise DataError(
                    f"{path}: line {line}, column {header[i]!r}: {cell!r} is not a number; "
                    f"expected every column but the label {label!r} to hold numbers"
                ) from None
            with np.errstate(over="ignore"):
                finite = bool(np.isfinite(np.float32(value)))  # checked after the cast, as for npz
            if not finite:
                raise DataError(
                    f"{path}: line {line}, column {header[i]!r}: {cell!r} is NaN, infinite or beyond float32's "
                    f"range (|x| <= {_FLOAT32_MAX:.3g}); expected finite numbers"
                )
            x[n, j] = value
    return x, _csv_labels(path, label, labels, [line for _, line in rows[1:]]), [header[i] for i in features]


def _csv_labels(path: str, label: str, labels: list[str], lines: list[int]) -> np.ndarray:
    """Integer labels int64 (N,) when every label parses as an integer, else the text (N,).

    Raises:
        DataError: an integer label does not fit in int64 (it would wrap or merge with another).
    """
    try:
        ints = [int(v) for v in labels]
    except ValueError:
        return np.array(labels, dtype=str)
    for v, line in zip(ints, lines, strict=True):
        if not -(2**63) <= v < 2**63:
            raise DataError(
                f"{path}: line {line}, column {label!r}: {v} is beyond int64's range; "
                "expected integer class labels that int64 holds, or text"
            )
    return np.array(ints, dtype=np.int64)


@register("dataset", "csv", injected=("seed",))
def csv(
    *,
    path: str,
    label: str,
    delimiter: Literal[",", ";", "\t", "|"] = ",",
    scale: Scale = "none",
    val_fraction: Fraction = 0.1,
    test_fraction: Fraction = 0.2,
    seed: int,
) -> Dataset:
    """Your own classification data from a CSV file with a header row.

    Args:
        path: the CSV file (relative to the current directory).
        label: name of the column holding the class; all other columns are features.
        delimiter: the field separator.
        scale: ``none`` (features as written), ``standard`` or ``minmax`` (training-split statistics).
        val_fraction: share of the samples held out for validation.
        test_fraction: share of the samples held out for testing.
        seed: seeds the random split.

    Returns:
        x float32 (N, F) features in column order (or scaled); y int64 (N,) class ids 0..K-1.
    """
    x, y, _ = read_csv(path, label, delimiter)
    return _dataset(path, x, y, path, val_fraction, test_fraction, seed, scale, name=f"column {label!r}")
