"""Position-wise feed-forward bricks."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from brickwork.nn.activations import activation
from brickwork.nn.permutation import Perm, Probe, Symmetry
from brickwork.registry import register

Activation = Literal["gelu", "relu", "silu", "tanh", "identity"]


@register("brick", "feed_forward")
class FeedForward(nn.Module):
    """Two-layer FFN ``W2 act(W1 x)``, or its gated form ``W2 (act(W1 x) * W3 x)`` (GLU).

    GLU variants follow Shazeer, "GLU Variants Improve Transformer" (2020); with ``silu``
    this is the SwiGLU FFN of LLaMA/Mixtral experts.

    Args:
        dim: input and output width D.
        hidden: inner width H (the neurons that MoEfication splits into experts).
        act: activation name.
        glu: use the gated form with a third projection.
        dropout: dropout on the inner activations.
        bias: add biases to the projections.

    Shapes:
        (..., D) -> (..., D)
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        act: Activation = "gelu",
        glu: bool = False,
        dropout: float = 0.0,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.up = nn.Linear(dim, hidden, bias=bias, **kw)
        self.gate = nn.Linear(dim, hidden, bias=bias, **kw) if glu else None
        self.down = nn.Linear(hidden, dim, bias=bias, **kw)
        self.act_name = act
        self.act = activation(act)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.up(x))
        if self.gate is not None:
            h = h * self.gate(x)
        return self.down(self.drop(h))

    def permutation_symmetry(self) -> Symmetry:
        """Hidden units permute freely (``up``/``gate`` rows with ``down`` columns); in and out follow the ends."""
        lin = {"up": {"in": "in", "out": "hidden"}, "down": {"in": "hidden", "out": "out"}}
        if self.gate is not None:
            lin["gate"] = {"in": "in", "out": "hidden"}
        perms = {"in": Perm(0), "out": Perm(0), "hidden": Perm(self.up.out_features)}
        probes = [Probe("down", "hidden", -1, input=True)]
        return Symmetry(perms, probes=probes, inputs="in", output="out", children=lin)


@register("brick", "dense_layer")
class DenseLayer(nn.Module):
    """``dropout(act(W x + b))``: one layer of a multi-layer perceptron.

    Args:
        d_in: input width.
        d_out: output width.
        act: activation name.
        dropout: dropout probability on the output.

    Shapes:
        (..., d_in) -> (..., d_out)
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        act: Activation = "gelu",
        dropout: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, d_out, device=device, dtype=dtype)
        self.act = activation(act)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.act(self.linear(x)))

    def permutation_symmetry(self) -> Symmetry:
        """The output units permute with the linear layer's rows (the activation is elementwise)."""
        return Symmetry(
            {"in": Perm(0), "out": Perm(0)}, inputs="in", output="out", children={"linear": {"in": "in", "out": "out"}}
        )
