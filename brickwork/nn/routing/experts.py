"""Expert banks: modules that run E experts on rows already sorted by expert.

The contract a routed layer relies on is one call, ``experts(x_sorted, counts)``: rows
``x_sorted`` (A, D) where expert ``e`` owns ``counts[e]`` consecutive rows, returning (A, D_out).

* :class:`ExpertList` is the generic path: any ``nn.Module`` per expert (a user's own), each
  run once on its contiguous slice.
* :class:`GroupedFFNExperts` is the fast path for FFN / GLU experts: weights stacked as
  (E, D, H) and run with one grouped matmul per projection (:func:`brickwork.kernels.grouped_linear`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from brickwork.kernels import GroupedBackend, fused_glu, grouped_linear
from brickwork.nn.activations import activation
from brickwork.nn.ffn import Activation, FeedForward
from brickwork.nn.permutation import Axis, Perm, Symmetry
from brickwork.registry import register


class ExpertList(nn.ModuleList):
    """Any expert modules, each run on its own contiguous slice of the sorted rows.

    A ``ModuleList`` so that state-dict keys read ``experts.{i}....`` as in most checkpoints.

    Args:
        experts: E modules, each (n, D) -> (n, D_out).
    """

    def __init__(self, experts: Iterable[nn.Module]) -> None:
        super().__init__(experts)

    @property
    def num_experts(self) -> int:
        return len(self)

    def forward(self, x_sorted: Tensor, counts: Tensor) -> Tensor:
        """(A, D) rows sorted by expert, (E,) counts -> (A, D_out)."""
        sizes = counts.tolist()
        # One split into views; an expert with no rows is not called (user modules such as
        # BatchNorm may reject empty batches).
        outs = [expert(chunk) for expert, chunk, n in zip(self, x_sorted.split(sizes), sizes, strict=True) if n > 0]
        if not outs:
            return x_sorted * 0
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def permutation_symmetry(self) -> Symmetry:
        """Each expert's own symmetry, its ends bound to the bank's; expert order is not offered (fixed)."""
        both = {"in": "in", "out": "out"}
        return Symmetry(
            {"in": Perm(0), "out": Perm(0)},
            inputs="in",
            output="out",
            children={str(i): both for i in range(len(self))},
        )


@register("brick", "grouped_ffn_experts")
class GroupedFFNExperts(nn.Module):
    """E feed-forward experts with stacked weights, run by grouped matrix multiplication.

    Computes, for the rows of expert ``e``, ``act(x W_in[e]) W_out[e]`` or, with ``glu``,
    ``(act(x W_a[e]) * (x W_b[e])) W_out[e]`` where ``W_in[e] = [W_a[e] | W_b[e]]`` is stored
    fused as (D, 2H) so both input projections are one grouped matmul. Each expert equals a
    :class:`~brickwork.nn.ffn.FeedForward` (``up`` = ``W_a``, ``gate`` = ``W_b``, ``down`` = ``W_out``);
    :meth:`from_feed_forward` and :meth:`to_feed_forward` convert exactly.

    Args:
        num_experts: E.
        dim: input and output width D.
        hidden: expert inner width H.
        act: activation name.
        glu: gated form (SwiGLU with ``act="silu"``, as in Mixtral's experts).
        bias: per-expert biases.
        backend: grouped-matmul implementation (``"auto"`` chooses per device; see
            :mod:`brickwork.kernels.grouped`).

    Shapes:
        ``forward(x_sorted (A, D), counts (E,)) -> (A, D)``
    """

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden: int,
        act: Activation = "gelu",
        glu: bool = False,
        bias: bool = False,
        backend: GroupedBackend = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.num_experts, self.dim, self.hidden = num_experts, dim, hidden
        self.act_name, self.glu, self.backend = act, glu, backend
        self.act = activation(act)
        width = 2 * hidden if glu else hidden
        self.w_in = nn.Parameter(torch.empty(num_experts, dim, width, **kw))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden, dim, **kw))
        self.b_in = nn.Parameter(torch.empty(num_experts, width, **kw)) if bias else None
        self.b_out = nn.Parameter(torch.empty(num_experts, dim, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Per-expert ``nn.Linear`` initialisation: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        for w, b, fan_in in ((self.w_in, self.b_in, self.dim), (self.w_out, self.b_out, self.hidden)):
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(w, -bound, bound)
            if b is not None:
                nn.init.uniform_(b, -bound, bound)

    def forward(self, x_sorted: Tensor, counts: Tensor) -> Tensor:
        z = grouped_linear(x_sorted, self.w_in, counts, self.b_in, backend=self.backend)
        # fused_glu writes both half-gradients into one buffer (no concatenation pass).
        h = fused_glu(z, self.act_name, self.act) if self.glu else self.act(z)
        return grouped_linear(h, self.w_out, counts, self.b_out, backend=self.backend)

    def permutation_symmetry(self) -> Symmetry:
        """Expert order (the port ``experts``, bound by the MoE to its router rows) and, nested in it,
        the hidden units inside each expert ((E, H), batched over the expert axis)."""
        perms = {"in": Perm(self.dim), "out": Perm(self.dim), "experts": Perm(self.num_experts)}
        perms["hidden"] = Perm(self.hidden, parent="experts")
        halves = (0, self.hidden) if self.glu else (0,)
        axes = [Axis("w_in", 0, "experts"), Axis("w_in", 1, "in"), Axis("w_out", 0, "experts"), Axis("w_out", 2, "out")]
        axes += [Axis("w_in", 2, "hidden", o, batch_dim=0) for o in halves] + [Axis("w_out", 1, "hidden", batch_dim=0)]
        if self.b_in is not None and self.b_out is not None:
            axes += [Axis("b_in", 0, "experts"), Axis("b_out", 0, "experts"), Axis("b_out", 1, "out")]
            axes += [Axis("b_in", 1, "hidden", o, batch_dim=0) for o in halves]
        return Symmetry(perms, axes, inputs="in", output="out", ports=("experts",))

    @classmethod
    def from_feed_forward(cls, experts: Sequence[FeedForward], backend: GroupedBackend = "auto") -> GroupedFFNExperts:
        """Stack E identical-shape :class:`FeedForward` experts (weights copied; dropout not carried)."""
        first = experts[0]
        dim, hidden = first.up.in_features, first.up.out_features
        glu, bias = first.gate is not None, first.up.bias is not None
        for f in experts:
            same = (f.up.in_features, f.up.out_features, f.gate is not None, f.act_name) == (
                dim,
                hidden,
                glu,
                first.act_name,
            )
            if not same:
                raise ValueError("GroupedFFNExperts.from_feed_forward: experts differ in shape, act or glu")
        p = first.up.weight
        out = cls(len(experts), dim, hidden, first.act_name, glu, bias, backend, device=p.device, dtype=p.dtype)
        with torch.no_grad():
            for e, f in enumerate(experts):
                w_in = [f.up.weight.t()] + ([f.gate.weight.t()] if f.gate is not None else [])
                out.w_in[e].copy_(torch.cat(w_in, dim=1))
                out.w_out[e].copy_(f.down.weight.t())
                if out.b_in is not None and out.b_out is not None:
                    b_in = [f.up.bias] + ([f.gate.bias] if f.gate is not None else [])
                    out.b_in[e].copy_(torch.cat(b_in))  # type: ignore[arg-type]
                    out.b_out[e].copy_(f.down.bias)
        return out

    def to_feed_forward(self, e: int) -> FeedForward:
        """Expert ``e`` as a standalone :class:`FeedForward` (weights copied)."""
        p = self.w_in
        ff = FeedForward(
            self.dim, self.hidden, self.act_name, self.glu, bias=self.b_in is not None, device=p.device, dtype=p.dtype
        )
        h = self.hidden
        with torch.no_grad():
            ff.up.weight.copy_(self.w_in[e, :, :h].t())
            if ff.gate is not None:
                ff.gate.weight.copy_(self.w_in[e, :, h:].t())
            ff.down.weight.copy_(self.w_out[e].t())
            if self.b_in is not None and self.b_out is not None:
                ff.up.bias.copy_(self.b_in[e, :h])
                if ff.gate is not None:
                    ff.gate.bias.copy_(self.b_in[e, h:])
                ff.down.bias.copy_(self.b_out[e])
        return ff

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, dim={self.dim}, hidden={self.hidden}, act={self.act_name}, "
            f"glu={self.glu}, bias={self.b_in is not None}, backend={self.backend}"
        )
