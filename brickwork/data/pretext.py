"""A self-supervised pre-training task built from other datasets' training images: rotation prediction.

``rotations`` (Gidaris et al., 2018, "Unsupervised representation learning by predicting image
rotations"): every training image of the ``sources`` (their labels dropped) appears four times,
turned by 0, 90, 180 and 270 degrees, and the label is which turn (0..3). A model trained on it
has seen both input distributions but none of their labels, which is what a multi-task merge
needs from its "pre-trained" start when no third labelled task of the same shape is installed
(``configs/merge/multitask-mnist-fashion.yaml``, ``docs/merge-notes.md``).

Only the sources' **train** splits are read (loaded with this dataset's ``seed``), so their val
and test images stay unseen; the four turns of one image always fall in the same split here.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from pydantic import Field

from brickwork.data.base import Dataset, Fraction, Split, check_fractions, split_indices
from brickwork.errors import DataError
from brickwork.registry import REGISTRY, register

ROTATION_CLASSES = ["0", "90", "180", "270"]


def rotated(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The four quarter turns of every image and their labels.

    Args:
        x: (N, C, H, H) square images.

    Returns:
        ``(x4 (4N, C, H, H), y4 (4N,))``: image i turned k times counter-clockwise sits at row
        4 i + k with label k.
    """
    turns = torch.stack([torch.rot90(x, k, dims=(2, 3)) for k in range(4)], dim=1)  # (N, 4, C, H, H)
    return turns.flatten(0, 1), torch.arange(4).repeat(len(x))


@register("dataset", "rotations", injected=("seed",))
def rotations(
    *,
    sources: Annotated[list[dict[str, Any]], Field(min_length=1)],
    per_source: Annotated[int, Field(ge=1)] | None = None,
    val_fraction: Fraction = 0.1,
    test_fraction: Fraction = 0.1,
    seed: int,
) -> Dataset:
    """Rotation prediction on the training images of ``sources`` (labels dropped), 4 classes.

    Args:
        sources: dataset specs, e.g. ``[{name: mnist5k}, {name: fashion-mnist, limit_train: 10000}]``;
            all of one square image shape.
        per_source: keep only the first this many training images of each source (None: all).
        val_fraction: share of the pooled images (all four turns of each) held out for validation.
        test_fraction: share held out for testing.
        seed: seeds the sources' splits and this split.

    Returns:
        x float32 (4 N, C, H, H), y int64 (4 N,) in 0..3 (quarter turns counter-clockwise).

    Raises:
        DataError: a source without a name, of another shape, or with images that are not square.
    """
    check_fractions(val_fraction, test_fraction)
    pools, shape = [], None
    for i, spec in enumerate(sources):
        raw = dict(spec)
        name = raw.pop("name", None)
        if not isinstance(name, str) or name == "rotations":
            raise DataError(f"rotations: sources[{i}] needs the name of another dataset, e.g. {{name: mnist5k}}")
        x = REGISTRY.get("dataset", name).obj(seed=seed, **raw).train.x
        if x.dim() != 4 or x.shape[2] != x.shape[3]:
            raise DataError(f"rotations: sources[{i}] ({name}) has inputs {tuple(x.shape[1:])}; expected (C, H, H)")
        if shape is not None and tuple(x.shape[1:]) != shape:
            raise DataError(f"rotations: sources[{i}] ({name}) has inputs {tuple(x.shape[1:])}, the first {shape}")
        shape = tuple(x.shape[1:])
        pools.append(x[:per_source])
    images = torch.cat(pools)
    tr, va, te = split_indices(len(images), val_fraction, test_fraction, seed)
    splits = [Split(*rotated(images[i])) for i in (tr, va, te)]
    names = ", ".join(str(s.get("name")) for s in sources)
    return Dataset(
        name="rotations",
        task="classify",
        train=splits[0],
        val=splits[1],
        test=splits[2],
        in_shape=tuple(images.shape[1:]),
        num_classes=4,
        classes=list(ROTATION_CLASSES),
        source=f"quarter turns of the training images of {names} (labels dropped)",
    )
