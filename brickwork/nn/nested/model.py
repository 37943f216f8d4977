"""A stack model whose sub-networks over width and depth are trained together (SortedNet).

Valipour et al. (2023), "SortedNet: A Scalable and Generalized Framework for Training Modular
Deep Neural Networks": the sub-networks are nested prefixes (the first units of every nested
dimension, the first layers of the body) sharing one set of parameters; each optimisation
step samples sub-networks and accumulates their gradients before one update. We visit the
sampled sub-networks in sorted order, largest first (a linear order compatible with nesting),
and optionally always include the largest and the smallest (the "sandwich rule" of
universally slimmable networks, Yu & Huang, 2019).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal, Protocol, TypeGuard

import torch
from torch import Tensor, nn

from brickwork.nn.nested.matryoshka import matryoshka_loss
from brickwork.nn.stack import StackModel

Sampling = Literal["all", "sandwich", "random"]
SubNet = tuple[float, int]  # (width fraction, depth)
LossFn = Callable[[Tensor, Tensor], Tensor]


class WidthBrick(Protocol):
    """A brick that follows a width setting and can be copied out at one width."""

    width: float

    def sliced(self, width: float) -> nn.Module: ...


def _follows_width(m: nn.Module) -> TypeGuard[WidthBrick]:
    return hasattr(m, "width") and callable(getattr(m, "sliced", None))


def nested_modules(model: nn.Module) -> Iterator[WidthBrick]:
    """Modules that follow a width setting: they have ``width`` and ``sliced(width)``."""
    return (m for m in model.modules() if _follows_width(m))


def subnet_label(width: float, depth: int) -> str:
    return f"w{width:g}-d{depth}"


class NestedModel(StackModel):
    """``head(body[:depth](stem(x)))`` at a width fraction, with SortedNet training.

    It is a :class:`StackModel` (same stem / body / head and state-dict layout), whose nested
    bricks follow :meth:`configure`. At the full width and depth it is the plain model.

    Args:
        model: a stack model built from nested bricks (:mod:`brickwork.nn.nested.layers`).
        widths: width fractions of the sub-networks trained.
        depths: body depths of the sub-networks (default: only the full depth). A depth must
            leave a hidden state the head accepts.
        sampling: per step, train ``all`` sub-networks, a ``random`` ``samples`` of them, or the
            largest and smallest plus random others (``sandwich``).
        samples: sub-networks per step for ``random`` and ``sandwich``.
        matryoshka: nested representation sizes; when given, each sub-network's loss is the
            Matryoshka loss over those prefixes of the head's input.

    Shapes:
        as the wrapped model.
    """

    def __init__(
        self,
        model: StackModel,
        widths: Sequence[float] = (1.0,),
        depths: Sequence[int] | None = None,
        sampling: Sampling = "sandwich",
        samples: int = 3,
        matryoshka: Sequence[int] = (),
    ) -> None:
        super().__init__(model.stem, model.body, model.head)
        n = len(self.body)
        self.widths = sorted({float(w) for w in widths}, reverse=True)
        self.depths = sorted(set(depths or [n]), reverse=True)
        for w in self.widths:
            if not 0 < w <= 1:
                raise ValueError(f"NestedModel: width fractions must be in (0, 1], got {w}")
        for d in self.depths:
            if not 1 <= d <= n:
                raise ValueError(f"NestedModel: depth {d} is outside 1..{n}")
        if samples < 1:
            raise ValueError("NestedModel: samples must be >= 1")
        self.sampling, self.samples, self.matryoshka = sampling, samples, tuple(matryoshka)
        self.width, self.depth = 1.0, n

    def subnetworks(self) -> list[SubNet]:
        """Every trained (width, depth), largest first (descending width, then depth)."""
        return sorted(itertools.product(self.widths, self.depths), reverse=True)

    def configure(self, width: float = 1.0, depth: int | None = None) -> None:
        """Run as the sub-network of ``width`` (fraction) and ``depth`` (body layers) from now on."""
        depth = len(self.body) if depth is None else depth
        if not 0 < width <= 1 or not 1 <= depth <= len(self.body):
            raise ValueError(f"configure: width {width} must be in (0, 1] and depth {depth} in 1..{len(self.body)}")
        for m in nested_modules(self):
            m.width = width
        self.width, self.depth = width, depth

    @contextmanager
    def at(self, width: float, depth: int | None = None) -> Iterator[NestedModel]:
        """Context in which the model runs as one sub-network; the previous setting is restored."""
        saved = (self.width, self.depth)
        self.configure(width, depth)
        try:
            yield self
        finally:
            self.configure(*saved)

    def hidden(self, x: Tensor) -> Tensor:
        """The body's output at the current setting (the head's input)."""
        h = self.stem(x)
        return self.body(h) if self.depth == len(self.body) else self.body(h, chain=range(self.depth))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.hidden(x))

    def sample(self) -> list[SubNet]:
        """The sub-networks of one training step, in sorted order (largest first).

        Uses torch's global generator, which the training state checkpoints, so a resumed
        run samples the same sub-networks.
        """
        subnets = self.subnetworks()
        if self.sampling == "all" or len(subnets) <= self.samples:
            return subnets
        if self.sampling == "sandwich":
            middle = subnets[1:-1]
            k = max(self.samples - 2, 0)
            pick = [middle[i] for i in torch.randperm(len(middle))[:k].tolist()]
            chosen = [subnets[0], *pick, subnets[-1]][: max(self.samples, 1)]
        else:
            chosen = [subnets[i] for i in torch.randperm(len(subnets))[: self.samples].tolist()]
        return sorted(set(chosen), reverse=True)

    def _loss(self, x: Tensor, y: Tensor, loss_fn: LossFn) -> Tensor:
        if not self.matryoshka:
            return loss_fn(self(x), y)
        return matryoshka_loss(self.hidden(x), self.head, y, loss_fn, self.matryoshka)

    def training_loss(self, x: Tensor, y: Tensor, loss_fn: LossFn) -> Tensor:
        """Mean loss of the sampled sub-networks, their gradients accumulated one at a time.

        Every sub-network but the last is backpropagated here (so only one graph is alive at a
        time, as in SortedNet's gradient accumulation); the returned scalar is the mean loss,
        whose graph covers the last sub-network only, so the training loop's ``backward()``
        completes the accumulation. The loop zeroes gradients before calling this.
        """
        subnets = self.sample()
        n = len(subnets)
        done = x.new_zeros((), dtype=torch.float32)
        last: Tensor | None = None
        for k, (w, d) in enumerate(subnets):
            with self.at(w, d):
                loss = self._loss(x, y, loss_fn) / n
            if k < n - 1 and loss.requires_grad:
                loss.backward()
                done = done + loss.detach()
            elif k < n - 1:
                done = done + loss
            else:
                last = loss
        assert last is not None
        return last + done.to(last.dtype)
