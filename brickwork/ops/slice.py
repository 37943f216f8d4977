"""Slice a nested sub-network out of a supernet as a standalone model (copies; the supernet is untouched).

The sliced model holds genuinely smaller tensors (the first rows / columns / heads / channels of
every nested parameter, copied) and the first ``depth`` body layers; run at its full width it
computes exactly what the supernet computes configured at ``(width, depth)``. Its parameters
have the layout the nested builder produces with smaller arguments
(:func:`brickwork.models.nested.sliced_args`), so a saved slice loads back into a freshly built
model.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from brickwork.nn.nested import NestedModel, nested_modules
from brickwork.nn.stack import Stack, StackModel


def slice_model(model: NestedModel, width: float, depth: int | None = None) -> NestedModel:
    """A standalone copy of ``model``'s sub-network at ``width`` (fraction) and ``depth`` (body layers).

    Args:
        model: the supernet; not modified.
        width: width fraction in (0, 1].
        depth: body layers kept (default all); the head must accept the hidden state there.

    Returns:
        A :class:`NestedModel` whose only sub-network is its full self.
    """
    n = len(model.body)
    depth = n if depth is None else depth
    if not 1 <= depth <= n:
        raise ValueError(f"slice_model: depth {depth} outside 1..{n}")
    if not 0 < width <= 1:
        raise ValueError(f"slice_model: width {width} outside (0, 1]")
    # deepcopy with a memo that maps every nested brick to its sliced copy: nested parameters
    # are never copied at full size, everything else (norms, embeddings, containers) is.
    memo = {id(m): m.sliced(width) for m in nested_modules(model)}
    stem = copy.deepcopy(model.stem, memo)
    layers = [copy.deepcopy(layer, memo) for layer in list(model.body.layers)[:depth]]
    head = copy.deepcopy(model.head, memo)
    return NestedModel(
        StackModel(stem, Stack(layers), head),
        widths=[1.0],
        depths=[depth],
        sampling=model.sampling,
        samples=model.samples,
        matryoshka=model.matryoshka,
    )


@torch.no_grad()
def slice_error(supernet: NestedModel, sliced: NestedModel, x: Tensor, width: float, depth: int) -> float:
    """Max absolute difference between ``sliced(x)`` and the supernet at ``(width, depth)``, in eval mode."""
    modes = supernet.training, sliced.training
    supernet.eval()
    sliced.eval()
    try:
        with supernet.at(width, depth):
            ref = supernet(x)
        return float((sliced(x) - ref).abs().max())
    finally:
        supernet.train(modes[0])
        sliced.train(modes[1])
