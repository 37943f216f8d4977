"""Matryoshka representation loss: every prefix of the representation is itself a representation.

Kusupati et al. (2022), "Matryoshka Representation Learning": the loss is a weighted sum of
the task loss of classifiers reading the first ``m`` features, for nested sizes ``m``. We use
their efficient, weight-tied variant (MRL-E): the classifier over the first ``m`` features is
the first ``m`` columns of the one classifier, which is exactly a head with a nested input
width (:class:`~brickwork.nn.nested.layers.NestedLinear`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

LossFn = Callable[[Tensor, Tensor], Tensor]


def prefix(h: Tensor, m: int) -> Tensor:
    """The first ``m`` features of ``h``: channels of (B, C, H, W), else the last dim of (B, ..., D)."""
    return h[:, :m] if h.dim() == 4 else h[..., :m]


def feature_size(h: Tensor) -> int:
    """Number of features of a hidden state (C of (B, C, H, W), else the last dim)."""
    return h.shape[1] if h.dim() == 4 else h.shape[-1]


def matryoshka_sizes(dims: Sequence[int], full: int) -> list[int]:
    """The nested sizes used for a representation of ``full`` features: those below it, and ``full``."""
    return sorted({m for m in dims if 0 < m < full} | {full})


def matryoshka_loss(
    h: Tensor, head: nn.Module, y: Tensor, loss_fn: LossFn, dims: Sequence[int], weights: Sequence[float] | None = None
) -> Tensor:
    """``sum_m c_m loss(head(h[:m]), y) / sum_m c_m`` over the nested sizes ``m``.

    Args:
        h: the representation, (B, D), (B, T, D) or (B, C, H, W).
        head: a head that accepts any prefix of the features (nested input width, no norm
            over the features).
        y: targets for ``loss_fn``.
        dims: nested sizes; those not below the representation size are replaced by it.
        weights: ``c_m`` per size of :func:`matryoshka_sizes` (default: all 1, as in the paper).
    """
    sizes = matryoshka_sizes(dims, feature_size(h))
    w = [1.0] * len(sizes) if weights is None else list(weights)
    if len(w) != len(sizes):
        raise ValueError(f"matryoshka_loss: {len(w)} weights for sizes {sizes}")
    losses = torch.stack([loss_fn(head(prefix(h, m)), y) for m in sizes])
    return (losses * torch.tensor(w, dtype=losses.dtype, device=losses.device)).sum() / sum(w)
