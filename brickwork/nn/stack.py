"""Stacks of layers that can be tapped by index and run as any chain of their layers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from brickwork.nn.permutation import Symmetry, chain_symmetry


class Stack(nn.Module):
    """An ordered list of layers, each mapping a hidden state to one of the next layer's input.

    Besides the plain forward pass, a stack exposes its intermediate outputs by layer index
    (the tap contract used by early exits, distillation and probes) and can run any chain of
    its layers: skip, repeat or reorder (chain-of-layers test-time depth adaptation).

    Args:
        layers: the layers, applied in order by :meth:`forward`.
    """

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def __len__(self) -> int:
        return len(self.layers)

    def forward(self, x: Tensor, chain: Sequence[int] | None = None) -> Tensor:
        """Run the layers of ``chain`` (default: all, in order) on ``x`` of shape (B, ...)."""
        if chain is None:
            for layer in self.layers:
                x = layer(x)
            return x
        for i in chain:
            x = self.layers[i](x)
        return x

    def taps(self, x: Tensor, indices: Sequence[int]) -> list[Tensor]:
        """Hidden states after each layer in ``indices`` (0-based, negative from the end).

        Layers past the deepest requested index are not run.

        Returns:
            One tensor per index, in the order of ``indices``.
        """
        n = len(self.layers)
        want = [i % n for i in indices]
        if not want:
            return []
        out: dict[int, Tensor] = {}
        for i in range(max(want) + 1):
            x = self.layers[i](x)
            if i in want:
                out[i] = x
        return [out[i] for i in want]

    def permutation_symmetry(self) -> Symmetry:
        """A chain: each layer's output permutation is the next layer's input permutation."""
        return chain_symmetry([f"layers.{i}" for i in range(len(self.layers))])


class StackModel(nn.Module):
    """``head(body(stem(x)))``: the shape of every reference model in brickwork.

    Keeping one shape lets operations that act on depth (exits, slicing, skipping, looping,
    stitching) work on every model: they only need ``body``.

    Args:
        stem: maps the raw input to the first hidden state (flatten, patch embed, token embed).
        body: the :class:`Stack` of repeated layers.
        head: maps the last hidden state to outputs (logits).
    """

    def __init__(self, stem: nn.Module, body: Stack, head: nn.Module) -> None:
        super().__init__()
        self.stem = stem
        self.body = body
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(self.stem(x)))

    def permutation_symmetry(self) -> Symmetry:
        """The chain stem -> body -> head (a transformer's residual stream is then one permutation)."""
        return chain_symmetry(["stem", "body", "head"])

    @property
    def num_layers(self) -> int:
        return len(self.body)

    def taps(self, x: Tensor, indices: Sequence[int]) -> list[Tensor]:
        """Hidden states after the body layers in ``indices``; see :meth:`Stack.taps`."""
        return self.body.taps(self.stem(x), indices)

    @torch.no_grad()
    def layer_shapes(self, x: Tensor) -> list[tuple[int, ...]]:
        """Per-sample shape of the hidden state after each body layer, for input ``x``."""
        return [tuple(h.shape[1:]) for h in self.taps(x, range(len(self.body)))]


def stack_of(model: nn.Module) -> StackModel:
    """``model`` itself, checked to be a :class:`StackModel`, for operations that act on depth.

    Raises:
        TypeError: ``model`` has no (stem, body, head) shape.
    """
    if not isinstance(model, StackModel):
        raise TypeError(f"this needs a StackModel (stem, body, head), not {type(model).__name__}")
    return model
