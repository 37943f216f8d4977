"""The Net2Net unit map: which old unit each unit of a wider layer copies, and the tensor edits it implies.

Net2WiderNet (Chen, Goodfellow & Shlens, 2016, "Net2Net: Accelerating Learning via Knowledge
Transfer", section 3.1): a layer of n units becomes one of n' > n units by a map
``g: [0, n') -> [0, n)`` with ``g(j) = j`` for the old units. The producer's rows (incoming
weights and bias) are copied, ``W'[j] = W[g(j)]``, so every copy computes the same value as its
original; the consumer's columns are divided by how many copies share an original,
``U'[:, j] = U[:, g(j)] / |g^-1(g(j))|``, so their sum is the old contribution. Exact for any
elementwise activation. The other choice, ``zero``, gives the new units fresh incoming weights
and zero outgoing ones: the consumer adds exact zeros (bit-exact where the matmul's summation
order is unchanged).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from brickwork.errors import BrickworkError

#: How new units start: ``split`` (Net2Net copies, outgoing weights divided) or ``zero``
#: (fresh incoming weights, zero outgoing weights).
WidthMode = Literal["split", "zero"]


def check_growth(what: str, old: int, new: int) -> None:
    """Refuse a "growth" that does not grow: ``new`` must exceed ``old``.

    Raises:
        BrickworkError: one line naming ``what`` (a module path and dimension) and both sizes.
    """
    if new <= old:
        raise BrickworkError(f"grow: {what} has {old} units; growing needs more than {old}, got {new}")


def unit_map(old: int, new: int, mode: WidthMode, generator: torch.Generator | None = None) -> Tensor:
    """(new,) long: the old unit each unit copies (``g`` above); ``g[:old] = arange(old)``.

    ``split`` draws the originals of the new units uniformly (Net2Net's random mapping);
    ``zero`` maps them cyclically (only their incoming-weight shapes use it).
    """
    head = torch.arange(old)
    if mode == "split":
        extra = torch.randint(old, (new - old,), generator=generator)
    else:
        extra = torch.arange(new - old) % old
    return torch.cat([head, extra])


def tiled_map(old: int, factor: int) -> Tensor:
    """(factor * old,) long: unit ``j`` copies ``j % old`` (every unit copied ``factor`` times)."""
    return torch.arange(factor * old) % old


def copies(g: Tensor, old: int) -> Tensor:
    """(old,) how many units of the map ``g`` copy each old unit (1 for an unsplit unit)."""
    return torch.bincount(g, minlength=old)


def take(t: Tensor, g: Tensor, dim: int) -> Tensor:
    """``t`` with its ``dim`` axis re-indexed by the map ``g``: the producer side (rows copied)."""
    return t.index_select(dim, g.to(t.device))


def spread(t: Tensor, g: Tensor, dim: int, old: int) -> Tensor:
    """``t`` re-indexed by ``g`` along ``dim`` and divided by the copy counts: the consumer side.

    The sum over the copies of one original equals its old slice, so ``t' x'`` equals ``t x``
    when ``x'`` holds ``x`` copied by ``g``.
    """
    n = copies(g, old).to(t.device, t.dtype)
    shape = [1] * t.dim()
    shape[dim] = len(g)
    return take(t, g, dim) / take(n, g, 0).view(shape)


def zero_tail(t: Tensor, old: int, dim: int) -> Tensor:
    """``t`` with every index ``>= old`` along ``dim`` set to zero (the consumer side of ``zero``)."""
    out = t.clone()
    out.narrow(dim, old, t.shape[dim] - old).zero_()
    return out


def fresh_tail(t: Tensor, old: int, dim: int, generator: torch.Generator | None = None) -> Tensor:
    """``t`` whose entries at index ``>= old`` along ``dim`` are redrawn: uniform with the old
    entries' root-mean-square scale (the producer side of ``zero``: trainable new units that
    differ from each other and from the units they would otherwise copy)."""
    out = t.clone()
    tail = out.narrow(dim, old, t.shape[dim] - old)
    scale = float(t.narrow(dim, 0, old).detach().pow(2).mean().sqrt()) if old else 0.0
    bound = scale * 3**0.5  # U(-b, b) has root-mean-square b / sqrt(3)
    draw = torch.rand(tail.shape, generator=generator, dtype=torch.float64) * 2 - 1
    tail.copy_((draw * bound).to(tail.dtype))
    return out


def grow_rows(
    t: Tensor, g: Tensor, dim: int, old: int, mode: WidthMode, generator: torch.Generator | None = None
) -> Tensor:
    """The producer side along ``dim``: copies (``split``) or copies with fresh new entries (``zero``)."""
    out = take(t, g, dim)
    return fresh_tail(out, old, dim, generator) if mode == "zero" else out


def grow_cols(t: Tensor, g: Tensor, dim: int, old: int, mode: WidthMode) -> Tensor:
    """The consumer side along ``dim``: divided copies (``split``) or zeros for new units (``zero``)."""
    return spread(t, g, dim, old) if mode == "split" else zero_tail(take(t, g, dim), old, dim)
