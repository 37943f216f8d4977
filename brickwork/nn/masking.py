"""Padding masks shared between bricks, so no forward signature has to carry them.

A sentence encoder gets padded token ids. Its stem knows which positions are padding; its
attention layers and its pooling head need to know too. Instead of widening every
``forward`` in the stack (which would break taps, chains, exits and slicing), the bricks that
need the mask share one :class:`PaddingMask` sub-brick: the stem writes it each forward and
the others read it.
"""

from __future__ import annotations

from torch import Tensor, nn


class PaddingMask(nn.Module):
    """Holds the (B, T) boolean mask of real tokens (True) of the current forward pass.

    It has no parameters or buffers (nothing in checkpoints); ``mask`` is None when every
    position is real.
    """

    def __init__(self) -> None:
        super().__init__()
        self.mask: Tensor | None = None

    def set(self, mask: Tensor | None) -> None:
        self.mask = None if mask is None or bool(mask.all()) else mask

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - not meant to be called
        raise TypeError("PaddingMask is state shared between bricks, not a layer")
