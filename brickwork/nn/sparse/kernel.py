"""Block-sparse linear as gathers plus batched matmuls: only connected blocks are multiplied.

Layout. The weight of a group-connected layer is stored compressed, (G_out, b_out, K) with
K = k * b_in: for output group ``o``, the columns of its k connected input blocks side by side.
Activations are handled *feature-major* inside: with x^T (d_in, B), the inputs output group
``o`` reads are k row blocks of x^T; one ``index_select`` of rows (contiguous memcpy of B floats
each) gathers them into X (G_out, K, B), and

* forward   y^T (G_out, b_out, B) = W @ X                           (one ``bmm``),
* weight    dW (G_out, b_out, K) = dy^T @ X^T                       (one ``bmm``),
* input     dx^T (G_in, b_in, B) = W'^T @ dY                        (one ``bmm``),

where for the input gradient the roles are swapped: input group ``g`` gathers the rows of
dy^T of the output groups that read it (dY, (G_in, m * b_out, B), m the largest out-degree)
and the matching weight blocks (W', padded with a zero block where g's out-degree is < m).
So no scatter-add is ever needed: measured on the 2-core CPU of this project, ``index_add_``
of the (G_out, K, B) partial gradients cost 0.10-0.12 of a dense matmul at 4096x4096, batch
2048, against 0.02 for a row gather (``docs/sparse-notes.md``).

The output y = (y^T)^T is returned as a transposed *view*: elementwise ops keep that layout, so
in a stack of group-connected layers the next layer finds x^T already contiguous and no
transpose is ever copied. A dense consumer (``nn.Linear``) reads the view with a transposed
BLAS operand at no cost.

Banded connectivity (output group ``o`` reads the cyclic band of input groups starting at
``c + o * step``; the ``band`` and ``ring`` patterns) needs no gather at all: after padding x^T
cyclically, X is a strided *view* (``as_strided``) of it, the fastest layout in the project's
CPU notes. With as many input as output groups the input gradient is banded too (input group
``g`` is read by the band of output groups ending at ``g - c``), so dY is a view as well. Any
other wiring takes the gather path above; after rewiring a band is usually gone.

Each plan is a handful of index tensors computed once per connectivity (:func:`build_plan`).

Which path runs is chosen by measurement (:func:`block_sparse_linear` with ``path="auto"``, via
:mod:`brickwork.kernels.autotune`): ``band`` (the strided views, banded wirings only), ``gather``
(``index_select`` + ``bmm``) or ``dense`` (the compressed weight scattered into a dense one, the
mask folded in, one dense matmul: faster than the gathers for small blocks on some CPUs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from brickwork.kernels import autotune

SparsePath = Literal["auto", "band", "gather", "dense"]


@dataclass(frozen=True)
class Band:
    """Row ``r`` of a banded operand reads blocks ``start + r * step`` ... ``+ width - 1`` (cyclically)."""

    start: int
    step: int
    width: int


@dataclass(frozen=True)
class BlockPlan:
    """Index tensors that execute one connectivity.

    Attributes:
        groups_in: G_in.
        groups_out: G_out.
        block_in: b_in, units per input group.
        block_out: b_out, units per output group.
        k: in-degree (input blocks per output group).
        m: largest out-degree (output groups reading one input group).
        fwd_rows: (G_out * K,) input units, in the weight's column order.
        bwd_rows: (G_in * m * b_out,) output units each input group gathers for its gradient.
        bwd_blocks: (G_in * m,) weight block (``o * k + j``) per gradient slot; ``G_out * k`` is
            the zero block used for padding.
        padded: whether any input group has out-degree below m (needs the zero block).
        inv_perm: (d_in,) the inverse of the input unit permutation, or None for identity.
        fwd_band: the forward gather as a strided view, when the wiring is a band.
        bwd_band: the input-gradient gather as a strided view, when that is a band too.
    """

    groups_in: int
    groups_out: int
    block_in: int
    block_out: int
    k: int
    m: int
    fwd_rows: Tensor
    bwd_rows: Tensor
    bwd_blocks: Tensor
    padded: bool
    inv_perm: Tensor | None
    fwd_band: Band | None = None
    bwd_band: Band | None = None


def build_plan(sources: Tensor, in_perm: Tensor, groups_in: int, d_out: int) -> BlockPlan:
    """Index tensors for ``sources`` (G_out, k) over input units ordered by ``in_perm`` (d_in,).

    Input group ``g`` consists of the units ``in_perm[g * b_in : (g + 1) * b_in]``.
    """
    groups_out, k = sources.shape
    d_in = in_perm.numel()
    b_in, b_out = d_in // groups_in, d_out // groups_out
    dev = sources.device
    fwd_rows = in_perm.view(groups_in, b_in)[sources].reshape(-1)
    # Input group g's readers, as flat block ids o * k + j, grouped by g (stable sort keeps o order).
    flat = sources.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=groups_in)
    m = max(int(counts.max()), 1)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(flat.numel(), device=dev) - starts[flat[order]]
    pad = groups_out * k
    table = torch.full((groups_in, m), pad, dtype=torch.long, device=dev)
    table[flat[order], rank] = order
    identity = bool(torch.equal(in_perm, torch.arange(d_in, device=dev)))
    fwd_band = _detect_band(sources, groups_in) if identity else None
    bwd_band = None
    if fwd_band is not None and fwd_band.step == 1 and groups_out == groups_in:
        # Input group g is read at slot j = k-1-s by output group g - c - (k-1) + s, s = 0..k-1:
        # order its slots by s so that its rows of dy^T form a band.
        c = fwd_band.start
        bwd_band = _least_padding(Band(-c - k + 1, 1, k), groups_in, groups_out)
        s = torch.arange(k, device=dev)
        readers = (torch.arange(groups_in, device=dev)[:, None] - c - k + 1 + s) % groups_out
        table = readers * k + (k - 1 - s)
    # Padded slots read output group 0's rows; their weight block is zero, so they add nothing.
    reader = torch.where(table == pad, 0, table // k)
    bwd_rows = (reader[:, :, None] * b_out + torch.arange(b_out, device=dev)).reshape(-1)
    return BlockPlan(
        groups_in,
        groups_out,
        b_in,
        b_out,
        k,
        m,
        fwd_rows,
        bwd_rows,
        table.reshape(-1),
        bool((counts < m).any()),
        None if identity else torch.argsort(in_perm),
        fwd_band,
        bwd_band,
    )


def _detect_band(sources: Tensor, groups_in: int) -> Band | None:
    """The band ``sources[o] = (c + o * step + [0, k)) % G_in``, if ``sources`` is one."""
    groups_out, k = sources.shape
    if groups_in % groups_out:
        return None
    step, c = groups_in // groups_out, int(sources[0, 0])
    o = torch.arange(groups_out, device=sources.device)[:, None]
    expected = (c + o * step + torch.arange(k, device=sources.device)) % groups_in
    return _least_padding(Band(c, step, k), groups_out, groups_in) if torch.equal(sources, expected) else None


def _least_padding(band: Band, rows: int, n: int) -> Band:
    """The same cyclic band with its start shifted by a multiple of ``n`` to need the least padding."""

    def padding(start: int) -> int:
        return max(0, -start) + max(0, start + (rows - 1) * band.step + band.width - n)

    start = min((band.start + shift * n for shift in (-2, -1, 0, 1, 2)), key=padding)
    return Band(start, band.step, band.width)


def _band_view(t: Tensor, band: Band, rows: int, block: int) -> Tensor | None:
    """(rows, width * block, B) strided view of the banded blocks of ``t`` (n * block, B), or None.

    ``t`` is padded cyclically (one ``cat``) where the band runs past either end.
    """
    n, batch = t.shape[0] // block, t.shape[1]
    lo, hi = band.start, band.start + (rows - 1) * band.step + band.width
    pre, post = max(0, -lo), max(0, hi - n)
    if pre > n or post > n:
        return None
    if pre or post:
        t = torch.cat(([t[(n - pre) * block :]] if pre else []) + [t] + ([t[: post * block]] if post else []))
    offset = t.storage_offset() + (lo + pre) * block * batch
    return t.as_strided((rows, band.width * block, batch), (band.step * block * batch, batch, 1), offset)


def _rows(t: Tensor) -> Tensor:
    """``t`` (B, D) as a contiguous (D, B): free when ``t`` is already a transposed view."""
    tt = t.t()
    return tt if tt.is_contiguous() else tt.contiguous()


class _GatheredBmm(torch.autograd.Function):
    """y = x W_dense^T + b with W_dense block-sparse, stored compressed as (G_out, b_out, K)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, plan: BlockPlan, band: bool) -> Tensor:
        xt = _rows(x)  # (d_in, B)
        batch = xt.shape[1]
        gathered = _band_view(xt, plan.fwd_band, plan.groups_out, plan.block_in) if band and plan.fwd_band else None
        if gathered is None:
            gathered = xt.index_select(0, plan.fwd_rows).view(plan.groups_out, -1, batch)  # (G_out, K, B)
        yt = torch.bmm(weight, gathered).view(-1, batch)  # (d_out, B)
        if bias is not None:
            yt.add_(bias[:, None])
        ctx.plan, ctx.band = plan, band
        ctx.has_bias = bias is not None
        ctx.save_for_backward(gathered if ctx.needs_input_grad[1] else None, weight)
        return yt.t()

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None]:
        gathered, weight = ctx.saved_tensors
        plan: BlockPlan = ctx.plan
        gyt = _rows(grad_y)  # (d_out, B)
        batch = gyt.shape[1]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_w = torch.bmm(gyt.view(plan.groups_out, plan.block_out, batch), gathered.transpose(1, 2))
        if ctx.needs_input_grad[0]:
            # Weight blocks (G_out * k, b_out, b_in), plus a zero block for padded slots, gathered
            # per input group. Advanced indexing, not index_select: with few large slices CPU
            # index_select ran 100x slower on 2 threads (docs/sparse-notes.md).
            nblocks = plan.groups_out * plan.k
            blocks = weight.new_empty(nblocks + int(plan.padded), plan.block_out, plan.block_in)
            blocks[:nblocks].view(plan.groups_out, plan.k, plan.block_out, plan.block_in).copy_(
                weight.view(plan.groups_out, plan.block_out, plan.k, plan.block_in).transpose(1, 2)
            )
            if plan.padded:
                blocks[nblocks].zero_()
            wt = blocks[plan.bwd_blocks].view(plan.groups_in, plan.m * plan.block_out, plan.block_in)
            dy = _band_view(gyt, plan.bwd_band, plan.groups_in, plan.block_out) if ctx.band and plan.bwd_band else None
            if dy is None:
                dy = gyt.index_select(0, plan.bwd_rows).view(plan.groups_in, plan.m * plan.block_out, batch)
            gxt = torch.bmm(wt.transpose(1, 2), dy).view(-1, batch)  # (d_in, B) in group order
            if plan.inv_perm is not None:
                gxt = gxt.index_select(0, plan.inv_perm)
            grad_x = gxt.t()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = gyt.sum(1)
        return grad_x, grad_w, grad_b, None, None


def _dense(x: Tensor, weight: Tensor, bias: Tensor | None, plan: BlockPlan) -> Tensor:
    """The ``dense`` path: scatter the compressed weight into (d_out, d_in) (differentiable), one matmul."""
    g, b_out, kk = weight.shape
    rows = plan.fwd_rows.view(g, 1, kk).expand(g, b_out, kk)
    dense = weight.new_zeros(g, b_out, plan.groups_in * plan.block_in).scatter(2, rows, weight)
    return F.linear(x, dense.view(g * b_out, -1), bias)


def sparse_paths(plan: BlockPlan) -> list[str]:
    """The paths that can run ``plan``, in :data:`brickwork.kernels.autotune.KINDS` order."""
    return [p for p in autotune.KINDS["sparse"] if p != "band" or plan.fwd_band is not None]


def tuned_sparse_path(x: Tensor, weight: Tensor, bias: Tensor | None, plan: BlockPlan) -> str:
    """The path ``"auto"`` resolves to: measured once per shape class (batch bucketed, widths,
    groups, in-degree, banded or not, dtype, pass) and cached; ``band`` (else ``gather``) inside
    compiled regions."""
    paths = sparse_paths(plan)
    if torch.compiler.is_compiling():
        return paths[0]
    d_in, d_out = plan.groups_in * plan.block_in, plan.groups_out * plan.block_out
    dims = (
        autotune.bucket(x.shape[0]),
        d_in,
        d_out,
        plan.groups_in,
        plan.groups_out,
        plan.k,
        int(plan.fwd_band is not None),
    )
    shape = autotune.shape_class("sparse", dims, x.dtype, x.device)
    backward = torch.is_grad_enabled()

    def bench() -> dict[str, Callable[[], object]]:
        # The call's own operands as new leaves sharing storage: nothing reaches the caller's graph.
        xs = x.detach().requires_grad_(backward)
        ws = weight.detach().requires_grad_(backward)
        bs = None if bias is None else bias.detach().requires_grad_(backward)

        def run(p: str) -> Callable[[], object]:
            def call() -> object:
                y = block_sparse_linear(xs, ws, bs, plan, path=p)  # type: ignore[arg-type]
                if backward:
                    y.backward(torch.ones_like(y))
                    xs.grad = ws.grad = None
                    if bs is not None:
                        bs.grad = None
                return None

            return call

        return {p: run(p) for p in paths}

    flops = 2 * x.shape[0] * weight.numel()
    return autotune.choose(shape, paths, bench if autotune.can_time(x) else None, flops)


def block_sparse_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, plan: BlockPlan, path: SparsePath = "auto"
) -> Tensor:
    """``x @ W_dense^T + bias`` computing only the connected blocks of W_dense (or, on the ``dense``
    path, all of them with the unconnected ones zero, where that measured faster).

    Args:
        x: (B, d_in); any layout (a transposed view is read without a copy).
        weight: (G_out, b_out, K) compressed weight, K = k * b_in (see :class:`BlockPlan`).
        bias: (d_out,) or None.
        plan: from :func:`build_plan` for this connectivity.
        path: ``band``, ``gather``, ``dense``, or ``auto`` (measured, :func:`tuned_sparse_path`);
            ``band`` on a wiring that is no band runs ``gather``.

    Returns:
        (B, d_out); on the gather and band paths a transposed view of a contiguous (d_out, B) tensor.
    """
    if path == "auto":
        path = tuned_sparse_path(x, weight, bias, plan)  # type: ignore[assignment]
    if path == "dense":
        return _dense(x, weight, bias, plan)
    if path not in ("band", "gather"):
        raise ValueError(f"block_sparse_linear: unknown path {path!r}; expected auto, band, gather or dense")
    return _GatheredBmm.apply(x, weight, bias, plan, path == "band")
