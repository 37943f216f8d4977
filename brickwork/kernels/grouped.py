"""Grouped linear: one matrix per group applied to that group's contiguous rows.

This is the inner operation of a mixture-of-experts FFN once tokens are sorted by expert:
rows ``x[o_{e-1}:o_e]`` are multiplied by ``weight[e]``. Three implementations:

* ``"grouped_mm"``: one ``torch._grouped_mm`` call (CUTLASS on CUDA, a CPU kernel in
  torch >= 2.9). Traps (measured, see ``docs/moe-notes.md``): offsets must be int32
  cumulative row ends; rows past the last offset are left uninitialised (we always cover
  every row); strides must be multiples of 16 bytes; its backward fails on a zero-stride
  incoming gradient (``y.sum().backward()``), so the output goes through
  :class:`_ContiguousGrad`; under ``torch.compile`` on the CPU it demands bf16, so compiled
  regions use ``"split"``.
* ``"split"``: ``x.split(counts)`` and ``weight.unbind(0)`` once, one matmul per group, one
  ``cat``. Never ``weight[e]`` or ``x[s:e]`` inside a loop: autograd would then build a
  full-size zero gradient per group (the ~40x backward blow-up of loop-over-experts code).
* ``"bmm"``: scatter rows into a zero-padded (G, max_count, K) buffer and run one ``bmm``.
  Wasteful under skewed loads (3.5x dense at max/mean load 3 in our notes); kept as a
  baseline and for tiny, balanced problems.

``"auto"`` chooses by measurement (:mod:`brickwork.kernels.autotune`): the first call of a shape
class (rows bucketed, widths, groups, dtype, pass) times the applicable backends on its own
operands and caches the fastest for this CPU; inside ``torch.compile`` the fixed rule of
:func:`choose_grouped_backend` applies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from brickwork.kernels import autotune

GroupedBackend = Literal["auto", "grouped_mm", "split", "bmm"]

_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    ``torch._grouped_mm``'s backward rejects expanded (zero-stride) gradients such as the one
    ``y.sum()`` produces; ``contiguous()`` is free when the gradient already is.
    """

    @staticmethod
    def forward(ctx: object, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> Tensor:
        return grad.contiguous()


def grouped_mm_supported(x: Tensor, weight: Tensor) -> bool:
    """Whether ``torch._grouped_mm`` can run ``x`` (A, K) against ``weight`` (G, K, M).

    Requires the op, a supported dtype (fp32/bf16/fp16; CUDA kernels are bf16), and row
    strides that are multiples of 16 bytes.
    """
    if not _HAS_GROUPED_MM or x.dtype != weight.dtype or x.device != weight.device:
        return False
    if x.device.type == "cuda":
        if x.dtype != torch.bfloat16:
            return False
    elif x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if x.device.type == "cpu" and torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return False
    align = 16 // x.element_size()
    return x.shape[-1] % align == 0 and weight.shape[-1] % align == 0


def choose_grouped_backend(x: Tensor, weight: Tensor) -> Literal["grouped_mm", "split", "bmm"]:
    """The backend ``"auto"`` resolves to for these operands.

    CUDA: ``grouped_mm`` in bf16 (one launch instead of one per expert); otherwise
    ``split``. CPU: ``grouped_mm`` where supported: in a SwiGLU MoE step (d_model 512, top-2,
    forward+backward) it measured 1.07 / 1.18 / 1.58x the dense FFN of equal active FLOPs at
    8192 tokens x 16 experts / 8192 x 64 / 2048 x 64, against 1.11 / 1.24 / 1.94x for
    ``split`` and 1.32 / 1.49 / 1.89x for ``bmm`` (``docs/moe-notes.md``); ``split`` elsewhere
    (float64, unaligned widths, compiled regions).
    """
    if grouped_mm_supported(x, weight):
        return "grouped_mm"
    return "split"


def grouped_backends(x: Tensor, weight: Tensor) -> list[str]:
    """The backends that can run these operands, in :data:`brickwork.kernels.autotune.KINDS` order."""
    return [b for b in autotune.KINDS["moe"] if b != "grouped_mm" or grouped_mm_supported(x, weight)]


def tuned_grouped_backend(x: Tensor, weight: Tensor, counts: Tensor) -> str:
    """The backend ``"auto"`` resolves to: measured once per shape class (cached), the fixed rule
    of :func:`choose_grouped_backend` inside compiled regions."""
    if torch.compiler.is_compiling():
        return choose_grouped_backend(x, weight)
    groups = weight.shape[0]
    shape = autotune.shape_class(
        "moe", (autotune.bucket(x.shape[0]), x.shape[1], weight.shape[2], groups), x.dtype, x.device
    )
    backward = torch.is_grad_enabled()

    def bench() -> dict[str, Callable[[], object]]:
        # The call's own operands, detached: new leaves (for the backward) that share storage, so
        # nothing is copied and no gradient reaches the caller's parameters or graph.
        xs = x.detach().requires_grad_(backward)
        ws = weight.detach().requires_grad_(backward)
        cs = counts.detach()

        def run(b: str) -> Callable[[], object]:
            def call() -> object:
                y = grouped_linear(xs, ws, cs, backend=b)  # type: ignore[arg-type]
                if backward:
                    y.backward(torch.ones_like(y))
                    xs.grad = ws.grad = None
                return None

            return call

        return {b: run(b) for b in grouped_backends(x, weight)}

    flops = 2 * x.shape[0] * x.shape[1] * weight.shape[2]
    return autotune.choose(shape, grouped_backends(x, weight), bench if autotune.can_time(x) else None, flops)


def grouped_linear(
    x: Tensor,
    weight: Tensor,
    counts: Tensor,
    bias: Tensor | None = None,
    *,
    backend: GroupedBackend = "auto",
) -> Tensor:
    """``y[rows of group g] = x[rows of group g] @ weight[g] (+ bias[g])``.

    Args:
        x: (A, K) rows sorted by group, group ``g`` owning ``counts[g]`` consecutive rows.
        weight: (G, K, M) one matrix per group (any strides; a transposed (G, M, K) view works).
        counts: (G,) integer rows per group; must sum to A.
        bias: optional (G, M) bias per group.
        backend: implementation; ``"auto"`` is chosen by measurement (:func:`tuned_grouped_backend`).

    Returns:
        (A, M) tensor.
    """
    if x.dim() != 2 or weight.dim() != 3 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"grouped_linear: x {tuple(x.shape)} does not fit weight {tuple(weight.shape)}")
    if counts.shape != (weight.shape[0],):
        raise ValueError(f"grouped_linear: counts {tuple(counts.shape)} for {weight.shape[0]} groups")
    if backend == "auto":
        backend = tuned_grouped_backend(x, weight, counts)  # type: ignore[assignment]
    if backend == "grouped_mm":
        if not grouped_mm_supported(x, weight):
            raise ValueError(
                f"grouped_linear: grouped_mm cannot run {x.dtype} on {x.device} with widths "
                f"{x.shape[1]} -> {weight.shape[2]} (rows must be 16-byte multiples); use backend='auto'"
            )
        y = _grouped_mm(x, weight, counts)
    elif backend == "split":
        y = _split(x, weight, counts)
    elif backend == "bmm":
        y = _padded_bmm(x, weight, counts)
    else:
        raise ValueError(f"grouped_linear: unknown backend {backend!r}")
    if bias is not None:
        y = y + bias.repeat_interleave(counts, dim=0, output_size=x.shape[0])
    return y


def _grouped_mm(x: Tensor, weight: Tensor, counts: Tensor) -> Tensor:
    if x.shape[0] == 0:
        return x.new_zeros(0, weight.shape[2]) + 0 * weight.sum()
    # Offsets are cumulative row ends and must be int32; the last equals A, so no output row
    # is left uninitialised.
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    y = torch._grouped_mm(x.contiguous(), weight, offs=offs)
    return _ContiguousGrad.apply(y)


def _split(x: Tensor, weight: Tensor, counts: Tensor) -> Tensor:
    sizes = counts.tolist()
    # One split and one unbind per call: each chunk and each matrix is a view whose gradient
    # autograd accumulates without a full-size zero tensor per group.
    outs = [xs @ w for xs, w, n in zip(x.split(sizes), weight.unbind(0), sizes, strict=True) if n > 0]
    if not outs:
        return x.new_zeros(0, weight.shape[2]) + 0 * weight.sum()
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def _padded_bmm(x: Tensor, weight: Tensor, counts: Tensor) -> Tensor:
    groups, rows = weight.shape[0], x.shape[0]
    width = int(counts.max()) if rows else 0
    group_of_row = torch.repeat_interleave(torch.arange(groups, device=x.device), counts, output_size=rows)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(rows, device=x.device) - starts[group_of_row]
    padded = x.new_zeros(groups, width, x.shape[1])
    padded = padded.index_put((group_of_row, pos), x)
    y = torch.bmm(padded, weight)
    return y[group_of_row, pos]
