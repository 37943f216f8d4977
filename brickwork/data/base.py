"""The one shape every dataset has in brickwork: three tensor splits plus what models need to know."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from brickwork.errors import DataError

Task = Literal["classify", "lm"]

#: A split fraction as a config may set it: 0 <= f < 1.
Fraction = Annotated[float, Field(ge=0, lt=1)]


@dataclass
class Split:
    """Inputs and targets of one split.

    ``x``: (N, C, H, W) float32 images, (N, F) float32 features, or (N, T) int64 token ids.
    ``y``: (N,) int64 class labels, or (N, T) int64 next-token ids for language modelling.
    """

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return len(self.x)


@dataclass
class Dataset:
    """A dataset split deterministically into train / val / test.

    Attributes:
        name: registry name (or file path for a user's own data).
        task: ``classify`` (one label per sample) or ``lm`` (next token at every position).
        in_shape: per-sample input shape, e.g. (1, 28, 28), (64,), or (T,) for text.
        num_classes: number of classes, or the vocabulary size for ``lm``.
        classes: human-readable class names (or the vocabulary characters for ``lm``).
        source: where the data came from (package, file), for reports.
        preprocess: what was done to the user's own data, recorded in every checkpoint so a
            model can be applied to new data the same way (plain JSON data): ``labels`` (the
            original label of each class id), ``scale`` (:class:`~brickwork.data.scaling.Scaling`
            as a dict), ``tokens`` (``char`` with its ``vocab``, or ``minilm``). Empty for
            built-in datasets.
    """

    name: str
    task: Task
    train: Split
    val: Split
    test: Split
    in_shape: tuple[int, ...]
    num_classes: int
    classes: list[str] = field(default_factory=list)
    source: str = ""
    preprocess: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        scale = self.preprocess.get("scale")
        return (
            f"{self.name}: {len(self.train)}/{len(self.val)}/{len(self.test)} train/val/test, "
            f"input {self.in_shape}, {self.num_classes} {'tokens' if self.task == 'lm' else 'classes'}"
            + (f", x scaled ({scale['kind']}, train-split statistics)" if scale else "")
        )


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Deterministic random split of ``range(n)`` into train / val / test index tensors."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    n_test = int(round(n * test_fraction))
    n_val = int(round(n * val_fraction))
    return perm[n_test + n_val :], perm[n_test : n_test + n_val], perm[:n_test]


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Raise :class:`DataError` unless some data is left for training after val and test."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1) or val_fraction + test_fraction >= 1:
        raise DataError(
            f"val_fraction + test_fraction must be below 1 so that a training split remains "
            f"(got val_fraction={val_fraction}, test_fraction={test_fraction})"
        )
