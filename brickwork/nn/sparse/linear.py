"""Group-to-group linear layer: G2GNet's sparse ensemble-to-ensemble wiring, executed sparsely.

G2GNet (Konstantaropoulos et al., 2025) splits the units of consecutive layers into ensembles
(groups) and connects only some group pairs, densely within a connected pair. Here the
connected blocks are stored compressed and multiplied by one batched matmul after a gather
(:mod:`.kernel`), so time and counted FLOPs fall with the fraction of blocks kept, unlike the
usual dense-matmul-with-a-0/1-mask. Inside connected blocks an optional edge mask adds
unstructured sparsity for dynamic sparse training (it saves nothing at run time: only block
sparsity does).

State that rewiring changes is held in buffers of fixed shape (``sources``, ``mask``) and the
weight parameter never changes shape, so an optimizer keeps its references and a checkpoint
restores the exact topology.
"""

from __future__ import annotations

import math
from typing import Annotated

import pydantic
import torch
from torch import Tensor, nn

from brickwork.nn.permutation import Axis, Perm, Probe, Symmetry
from brickwork.nn.sparse.connectivity import Pattern, from_matrix, make_pattern
from brickwork.nn.sparse.kernel import BlockPlan, block_sparse_linear, build_plan
from brickwork.nn.sparse.rewiring import Rewiring
from brickwork.registry import register

Fraction = Annotated[float, pydantic.Field(gt=0, le=1)]


def in_degree(density: float, edge_density: float, groups_in: int) -> int:
    """Input groups per output group so that ``k / G_in * edge_density == density`` exactly."""
    k = density / edge_density * groups_in
    if abs(k - round(k)) > 1e-6 or not 1 <= round(k) <= groups_in:
        raise ValueError(
            f"density {density} with edge_density {edge_density} needs {k:g} of {groups_in} input groups per "
            f"output group; choose density = edge_density * j / {groups_in} for an integer j in [1, {groups_in}]"
        )
    return round(k)


@register("brick", "group_linear")
class GroupLinear(nn.Module):
    """Linear layer whose input and output units are split into groups connected group to group.

    Args:
        d_in: input width; divisible by ``groups_in``.
        d_out: output width; divisible by ``groups``.
        groups: number of output groups G_out.
        density: fraction of the dense (d_out, d_in) weights kept, = k / G_in * ``edge_density``
            with k the input groups read by each output group.
        groups_in: number of input groups G_in (default: ``groups``).
        pattern: block pattern (:mod:`.connectivity`) used when ``connectivity`` is None.
        edge_density: fraction of edges kept inside each connected block (an edge mask; 1.0: none).
        small_world_p: rewiring probability of the ``small_world`` pattern.
        connectivity: user-given wiring: (G_out, k) integer sources, or a (G_out, G_in) bool
            matrix (uneven in-degree is padded with masked slots). Overrides ``pattern`` and the block
            part of ``density``.
        in_perm: (d_in,) order of input units: input group g is ``in_perm[g*b_in:(g+1)*b_in]``
            (default: identity). Folded into the gather, so it costs nothing.
        bias: learn an additive bias.
        rewiring: dynamic sparse training of this layer (:class:`Rewiring`), or None (static).

    Shapes:
        (..., d_in) -> (..., d_out)
    """

    # Buffers (registered in __init__; ``mask`` is None without an edge mask).
    sources: Tensor
    in_perm: Tensor
    mask: Tensor | None

    def __init__(
        self,
        d_in: int,
        d_out: int,
        groups: Annotated[int, pydantic.Field(ge=1)] = 16,
        density: Fraction = 0.25,
        groups_in: Annotated[int, pydantic.Field(ge=1)] | None = None,
        pattern: Pattern = "random",
        edge_density: Fraction = 1.0,
        small_world_p: float = 0.1,
        connectivity: Tensor | None = None,
        in_perm: Tensor | None = None,
        bias: bool = True,
        rewiring: Rewiring | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        groups_in = groups_in or groups
        if d_in % groups_in or d_out % groups:
            raise ValueError(
                f"group_linear: widths {d_in} -> {d_out} are not divisible by {groups_in} -> {groups} groups"
            )
        self.d_in, self.d_out, self.groups_in, self.groups_out = d_in, d_out, groups_in, groups
        self.block_in, self.block_out = d_in // groups_in, d_out // groups
        real = None
        if connectivity is None:
            k = in_degree(density, edge_density, groups_in)
            sources = make_pattern(pattern, groups, groups_in, k, p=small_world_p)
        elif connectivity.dtype == torch.bool:
            sources, real = from_matrix(connectivity)
        else:
            sources = connectivity.long().clone()
        if sources.shape[0] != groups or int(sources.max()) >= groups_in or int(sources.min()) < 0:
            raise ValueError(
                f"group_linear: connectivity {tuple(sources.shape)} does not fit {groups} x {groups_in} groups"
            )
        if any(len(set(row)) != len(row) for row in sources.tolist()):
            raise ValueError("group_linear: an output group lists the same input group twice")
        k = sources.shape[1]
        self.k = k
        self.register_buffer("sources", sources.to(device))
        perm = torch.arange(d_in) if in_perm is None else in_perm.clone().long()
        if not torch.equal(perm.sort().values, torch.arange(d_in)):
            raise ValueError("group_linear: in_perm is not a permutation of range(d_in)")
        self.register_buffer("in_perm", perm.to(device))
        self.weight = nn.Parameter(torch.empty(groups, self.block_out, k * self.block_in, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(d_out, device=device, dtype=dtype)) if bias else None
        mask = self._initial_mask(edge_density, real)
        self.register_buffer("mask", None if mask is None else mask.to(device))
        self.reset_parameters()
        self._plan: BlockPlan | None = None
        self._plan_key: tuple[int, ...] = ()
        self.rewiring: Rewiring | None = None
        self.set_rewiring(rewiring)

    def set_rewiring(self, rewiring: Rewiring | None) -> None:
        """Attach (or with None, detach) dynamic sparse training, e.g. after ``ops.sparsify``."""
        if rewiring is not None:
            rewiring.bind(self)
        self.rewiring = rewiring

    def _initial_mask(self, edge_density: float, real: Tensor | None) -> Tensor | None:
        """(G_out, b_out, K) bool: padded slots off, then ``edge_density`` of each output group's edges on."""
        if edge_density >= 1.0 and real is None:
            return None
        shape = self.weight.shape
        allowed = torch.ones(shape, dtype=torch.bool)
        if real is not None:
            allowed &= real.repeat_interleave(self.block_in, dim=1)[:, None, :]
        # The same fraction of each output group's allowed edges, placed at random.
        scores = torch.rand(shape).masked_fill(~allowed, -1.0).view(shape[0], -1)
        mask = torch.zeros_like(scores, dtype=torch.bool)
        for o, (row, ok) in enumerate(zip(scores, allowed.view(shape[0], -1), strict=True)):
            mask[o, row.topk(round(edge_density * int(ok.sum()))).indices] = True
        return mask.view(shape)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """As ``nn.Linear`` (uniform, bound 1/sqrt(fan-in)), with the fan-in a unit really has.

        With sparse connectivity a unit sums fewer inputs; scaling by the actual fan-in keeps
        activations at the dense layer's scale (Evci et al., 2022, on sparse initialisation).
        """
        fan_in = self.weight.shape[2] if self.mask is None else max(float(self.mask.sum()) / self.d_out, 1.0)
        bound = 1.0 / math.sqrt(fan_in)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.mask is not None:
            self.weight.mul_(self.mask)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def plan(self) -> BlockPlan:
        """The execution plan of the current connectivity (rebuilt when ``sources`` or ``in_perm`` change)."""
        key = (self.sources._version, self.in_perm._version, self.sources.data_ptr(), self.in_perm.data_ptr())
        if self._plan is None or key != self._plan_key or self._plan.fwd_rows.device != self.sources.device:
            self._plan = build_plan(self.sources, self.in_perm, self.groups_in, self.d_out)
            self._plan_key = key
        return self._plan

    def effective_weight(self) -> Tensor:
        """(G_out, b_out, K) the weights the forward uses (masked edges zero)."""
        return self.weight if self.mask is None else self.weight * self.mask

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.d_in)
        w = self.effective_weight()
        y = block_sparse_linear(flat, w, self.bias, self.plan())
        if self.rewiring is not None and self.training and torch.is_grad_enabled():
            self.rewiring.observe(self, flat, y, w)
        return y.view(*lead, self.d_out)

    def after_step(self) -> None:
        """Training hook: let the rewiring prune and regrow on its schedule."""
        if self.rewiring is not None:
            self.rewiring.update(self)

    def after_epoch(self) -> None:
        """Training hook: SET's end-of-epoch update (a rewiring with ``interval="epoch"``)."""
        if self.rewiring is not None:
            self.rewiring.epoch_end(self)

    def take_regrown(self) -> list[tuple[nn.Parameter, Tensor]]:
        """Training hook: the weight positions regrown by the last update (once), for the loop to
        reset the optimizer's state there (``nn.hooks``)."""
        grown = None if self.rewiring is None else self.rewiring.pop_regrown()
        return [] if grown is None else [(self.weight, grown)]

    @property
    def density(self) -> float:
        """Fraction of the dense layer's weights that are kept (active edges / (d_out * d_in))."""
        active = self.weight.numel() if self.mask is None else int(self.mask.sum())
        return active / (self.d_out * self.d_in)

    @torch.no_grad()
    def dense_weight(self) -> Tensor:
        """(d_out, d_in) the equivalent dense weight, zero where not connected (the masked reference)."""
        w = self.effective_weight().detach()
        rows = self.plan().fwd_rows.view(self.groups_out, 1, -1).expand_as(w)
        dense = w.new_zeros(self.groups_out, self.block_out, self.d_in)
        return dense.scatter_(2, rows, w).view(self.d_out, self.d_in)

    def connectivity_mask(self) -> Tensor:
        """(d_out, d_in) bool, the edges this layer has (connected blocks and edge mask)."""
        on = torch.ones_like(self.weight, dtype=torch.bool) if self.mask is None else self.mask
        rows = self.plan().fwd_rows.view(self.groups_out, 1, -1).expand_as(self.weight)
        dense = torch.zeros(self.groups_out, self.block_out, self.d_in, dtype=torch.bool, device=on.device)
        return dense.scatter_(2, rows, on).view(self.d_out, self.d_in)

    @torch.no_grad()
    def copy_dense_(self, weight: Tensor, bias: Tensor | None = None) -> GroupLinear:
        """Load the connected entries of a dense (d_out, d_in) weight (and the bias); returns self."""
        rows = self.plan().fwd_rows.view(self.groups_out, 1, -1).expand_as(self.weight)
        self.weight.copy_(weight.view(self.groups_out, self.block_out, self.d_in).gather(2, rows))
        if self.mask is not None:
            self.weight.mul_(self.mask)
        if bias is not None and self.bias is not None:
            self.bias.copy_(bias)
        return self

    def permutation_symmetry(self) -> Symmetry:
        """Output groups permute as whole groups (``groups``; ``out`` nested: units inside each group);
        any permutation of the input units is absorbed by ``in_perm`` (its values are remapped, the
        weights do not move). A layer with rewiring attached declares nothing (fixed): its
        statistics are not permuted.
        """
        if self.rewiring is not None:
            return Symmetry()
        perms = {"in": Perm(self.d_in), "groups": Perm(self.groups_out), "out": Perm(self.block_out, parent="groups")}
        axes = [Axis("in_perm", 0, "in", values=True), Axis("sources", 0, "groups")]
        for t in ("weight",) + (("mask",) if self.mask is not None else ()):
            axes += [Axis(t, 0, "groups"), Axis(t, 1, "out", batch_dim=0)]
        if self.bias is not None:
            axes.append(Axis("bias", 0, "out"))
        return Symmetry(perms, axes, [Probe("", "out", -1)], inputs="in", output="out")

    def extra_repr(self) -> str:
        return (
            f"{self.d_in}, {self.d_out}, groups={self.groups_in}->{self.groups_out}, k={self.k}, "
            f"density={self.density:.3f}, bias={self.bias is not None}"
        )
