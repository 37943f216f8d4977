"""Datasets behind the registry: real data that installs offline, and the user's own files.

Every loader returns a :class:`Dataset` with deterministic train / val / test splits.
Built-in names (``brickwork ls dataset``): ``digits``, ``mnist5k``, ``fashion-mnist``
(images), ``rotations`` (a self-supervised task on other datasets' images), ``hamlet``,
``bible`` (character-level text), ``rotten-tomatoes``, ``convention-speeches`` (sentences),
``npz``, ``csv``, ``txt``, ``jsonl`` (your files; the contract is ``docs/data.md``).

Example:
    >>> from brickwork.data import load_dataset
    >>> ds = load_dataset("digits", seed=0, val_fraction=0.1)
    >>> ds.train.x.shape[1:]
    torch.Size([1, 8, 8])
"""

from __future__ import annotations

from typing import Any

from brickwork.data import files, images, pretext, scaling, sentences, speeches, text, user_text
from brickwork.data.base import Dataset, Split, Task, split_indices
from brickwork.data.batching import batches, epoch_order, input_batches, num_batches
from brickwork.data.files import check_file
from brickwork.data.images import read_idx
from brickwork.data.scaling import Scaling, apply_scaling
from brickwork.data.text import encode
from brickwork.data.tokenizer import Tokenizer
from brickwork.registry import REGISTRY


def load_dataset(name: str, seed: int, **args: Any) -> Dataset:
    """Load the registered dataset ``name`` with config arguments ``args``.

    Args:
        name: a registry name of kind ``dataset``, e.g. ``digits`` or ``csv``.
        seed: seeds the split (injected, as brickwork does for configs).
        **args: the dataset's own arguments, e.g. ``path=...``, ``val_fraction=0.1``.

    Raises:
        ConfigError: unknown dataset name (with close matches).
        DataError: the data is missing or malformed.
    """
    entry = REGISTRY.get("dataset", name)  # every dataset module is imported above
    return entry.obj(seed=seed, **args)


__all__ = [
    "Dataset",
    "Scaling",
    "Split",
    "Task",
    "Tokenizer",
    "apply_scaling",
    "batches",
    "check_file",
    "encode",
    "epoch_order",
    "files",
    "images",
    "input_batches",
    "load_dataset",
    "num_batches",
    "pretext",
    "read_idx",
    "scaling",
    "sentences",
    "speeches",
    "split_indices",
    "text",
    "user_text",
]
