"""Prefix slices of weights, as views, with a backward that writes into the full gradient.

A nested (SortedNet / slimmable) layer at width ``w`` uses the first rows and columns of its
weights: ``W[:o, :i]``. Slicing is a view, so the forward pass copies nothing. Autograd's
backward of that view, however, materialises a full-size zero tensor for every slice and
copies the slice's gradient into it (``slice_backward``), then adds it to ``.grad``: measured
1.2-1.4x a separately built small layer at batch 256 (``shared/notes/cpu-measurements.md``,
"Nested slicing backward is not free"). The autograd functions here instead add the slice's
gradient in place into the parameter's ``.grad`` (allocated once per optimisation step, then
reused by every sub-network of a SortedNet gradient-accumulation step).

Consequence, stated once: while training through these functions, a sliced parameter's
gradient arrives in ``.grad`` but is not returned through the autograd graph, so
``torch.autograd.grad(loss, params)`` and gradient hooks (as data-parallel wrappers use) do
not see it. Outside of grad mode, or at full width, the plain functional ops run.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def units(width: float, n: int) -> int:
    """Active units of a dimension of size ``n`` at width fraction ``width`` in (0, 1].

    Rounded half up, at least 1, at most ``n``. Every nested brick and the slicing
    operation use this one function, so a producer and a consumer always agree on a size.
    """
    if not 0.0 < width <= 1.0:
        raise ValueError(f"width must be in (0, 1], got {width}")
    return max(1, min(n, int(math.floor(width * n + 0.5))))


def _grad_buffer(p: Tensor, *sizes: int) -> Tensor:
    """``p.grad``, allocated as zeros when it does not exist yet (first slice of a step); records
    that the prefix ``sizes`` of it is about to be written (see :func:`zero_written_grads`)."""
    if p.grad is None:
        p.grad = torch.zeros_like(p)
    _mark_written(p, sizes)
    return p.grad


# Which prefix of a parameter's .grad was written since zero_written_grads last zeroed it: a tuple
# of sizes (the empty tuple: nothing, the buffer is all zeros), or None: written anywhere (autograd
# accumulated into it; zero it whole). Kept on the parameter itself, set only for parameters a
# sliced function has written, which also get a hook marking autograd's own accumulation.
_WRITTEN = "_brickwork_grad_written"


def _written_by_autograd(ref: weakref.ref[Tensor], grad: Tensor | None) -> None:
    """Tensor hook: autograd brings a gradient for the whole parameter (it will write all of .grad).
    The sliced functions return no gradient for their parameters: the hook then sees None."""
    p = ref()
    if p is not None and grad is not None:
        setattr(p, _WRITTEN, None)


def _mark_written(p: Tensor, sizes: tuple[int, ...]) -> None:
    if not hasattr(p, _WRITTEN):
        # Autograd's own accumulation (a full-width step, autograd through a view) writes all of .grad.
        p.register_hook(functools.partial(_written_by_autograd, weakref.ref(p)))
        setattr(p, _WRITTEN, None)  # unknown until the first zero_written_grads
    seen = getattr(p, _WRITTEN)
    if seen is not None:
        setattr(p, _WRITTEN, tuple(max(a, b) for a, b in zip(seen, sizes, strict=True)) if seen else sizes)


def zero_written_grads(params: Iterable[Tensor]) -> None:
    """Zero the gradients of ``params`` in place, keeping the buffers (as
    ``optimizer.zero_grad(set_to_none=False)``), but for a gradient that only the sliced functions
    here wrote since the last call, zero only the prefix they wrote.

    Why: a sub-network at width 1/4 writes 1/16 of a square weight's gradient, yet a full-size
    zero gradient per step (``p.grad = None`` and a fresh ``zeros_like``, or ``zero_()``) writes all
    of it: at batch 256 that zero-fill put a 4x1024 MLP's training step at width 1/4 at 1.28x a
    separately built small model, against 1.13x with only the prefix zeroed (one thread, CPU
    clock; ``docs/perf-notes.md``). A gradient autograd accumulated into (full width, plain
    autograd), or one never seen by a sliced function, is zeroed whole.

    Args:
        params: parameters (e.g. ``model.parameters()``).
    """
    for p in params:
        if p.grad is None:
            continue
        seen = getattr(p, _WRITTEN, None)
        if seen is None:
            p.grad.zero_()
        elif seen:
            p.grad[tuple(slice(0, n) for n in seen)].zero_()
        if hasattr(p, _WRITTEN):
            setattr(p, _WRITTEN, ())


class _SlicedLinear(torch.autograd.Function):
    """``F.linear(x, W[:rows, :cols], b[:rows])`` with gradients written into ``W.grad`` in place."""

    # ``ctx`` is typed Any: it carries the parameters and slice sizes as ad-hoc attributes.

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, rows: int, cols: int) -> Tensor:
        ctx.save_for_backward(x)
        # The parameters themselves (not saved copies): backward writes their .grad.
        ctx.weight, ctx.bias, ctx.rows, ctx.cols = weight, bias, rows, cols
        return F.linear(x, weight[:rows, :cols], None if bias is None else bias[:rows])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None, None]:
        (x,) = ctx.saved_tensors
        weight, bias, rows, cols = ctx.weight, ctx.bias, ctx.rows, ctx.cols
        grad_x = grad @ weight[:rows, :cols] if ctx.needs_input_grad[0] else None
        g2 = grad.reshape(-1, rows)
        if ctx.needs_input_grad[1]:
            _grad_buffer(weight, rows, cols)[:rows, :cols].addmm_(g2.t(), x.reshape(-1, cols))
        if bias is not None and ctx.needs_input_grad[2]:
            _grad_buffer(bias, rows)[:rows].add_(g2.sum(0))
        return grad_x, None, None, None, None


class _SlicedConv2d(torch.autograd.Function):
    """``F.conv2d(x, W[:out, :in], b[:out])`` with gradients written into ``W.grad`` in place."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, out_ch: int, in_ch: int, stride: int, padding: int
    ) -> Tensor:
        ctx.save_for_backward(x)
        ctx.weight, ctx.bias, ctx.out_ch, ctx.in_ch = weight, bias, out_ch, in_ch
        ctx.stride, ctx.padding = stride, padding
        return F.conv2d(x, weight[:out_ch, :in_ch], None if bias is None else bias[:out_ch], stride, padding)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        weight, bias, o, i = ctx.weight, ctx.bias, ctx.out_ch, ctx.in_ch
        need_b = bias is not None and ctx.needs_input_grad[2]
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad,
            x,
            weight[:o, :i],
            [o] if bias is not None else None,
            [ctx.stride] * 2,
            [ctx.padding] * 2,
            [1, 1],
            False,
            [0, 0],
            1,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], need_b],
        )
        if ctx.needs_input_grad[1]:
            _grad_buffer(weight, o, i, *weight.shape[2:])[:o, :i].add_(gw)
        if need_b:
            _grad_buffer(bias, o)[:o].add_(gb)
        return gx, None, None, None, None, None, None


def _tracks_grad(*params: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params)


def sliced_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, rows: int, cols: int, *, inplace_grad: bool = True
) -> Tensor:
    """``x @ W[:rows, :cols]^T + b[:rows]`` for x of shape (..., cols) -> (..., rows).

    Args:
        inplace_grad: accumulate the weight gradient in place into ``weight.grad`` (see the
            module docstring); False uses plain autograd through the view (the baseline the
            benchmark compares against).
    """
    full = rows == weight.shape[0] and cols == weight.shape[1]
    if full or not inplace_grad or not _tracks_grad(weight, bias):
        return F.linear(
            x, weight if full else weight[:rows, :cols], None if bias is None else (bias if full else bias[:rows])
        )
    return _SlicedLinear.apply(x, weight, bias, rows, cols)


def sliced_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    out_ch: int,
    in_ch: int,
    stride: int,
    padding: int,
    *,
    inplace_grad: bool = True,
) -> Tensor:
    """``conv2d(x, W[:out_ch, :in_ch], b[:out_ch])`` for x of shape (B, in_ch, H, W)."""
    full = out_ch == weight.shape[0] and in_ch == weight.shape[1]
    if full or not inplace_grad or not _tracks_grad(weight, bias):
        w = weight if full else weight[:out_ch, :in_ch]
        b = None if bias is None else (bias if full else bias[:out_ch])
        return F.conv2d(x, w, b, stride, padding)
    return _SlicedConv2d.apply(x, weight, bias, out_ch, in_ch, stride, padding)
