"""Accuracy of a Matryoshka-trained nested model's head on prefixes of its features.

Matryoshka Representation Learning (Kusupati et al., 2022) trains one head to read the first
``m`` features of the representation for several ``m``; this measures how well it does at each.
Reads the model; never changes it.
"""

from __future__ import annotations

from typing import Any

import torch

from brickwork.data.base import Split
from brickwork.data.batching import batches
from brickwork.nn.modes import evaluating
from brickwork.nn.nested import NestedModel, matryoshka_sizes, prefix


@torch.no_grad()
def matryoshka_accuracy(
    model: NestedModel, data: Split, batch_size: int = 256, device: str = "cpu"
) -> list[dict[str, Any]]:
    """``[{"size": m, "accuracy": ...}]``: the full network's head on the first ``m`` features.

    The representation is (B, C, H, W) for convolutional bodies (channels are the prefix) or
    (B, D); the sizes are those :func:`~brickwork.nn.nested.matryoshka_sizes` trains.
    """
    with evaluating(model):
        hs = [(model.hidden(x), y) for x, y in batches(data.x, data.y, batch_size, device=device)]
        full = hs[0][0].shape[1] if hs[0][0].dim() == 4 else hs[0][0].shape[-1]
        rows = []
        for m in matryoshka_sizes(model.matryoshka, full):
            hit = sum(int((model.head(prefix(h, m)).argmax(-1) == y).sum()) for h, y in hs)
            rows.append({"size": m, "accuracy": hit / sum(y.numel() for _, y in hs)})
        return rows
