"""``dropout(act(linear(x)))`` around a linear module that is passed in (dense or group-connected)."""

from __future__ import annotations

from typing import Annotated

import pydantic
from torch import Tensor, nn

from brickwork.nn.activations import activation
from brickwork.nn.ffn import Activation
from brickwork.nn.permutation import Perm, Probe, Symmetry
from brickwork.registry import register


@register("brick", "linear_act")
class LinearAct(nn.Module):
    """One MLP layer built around a given linear module, e.g. a :class:`GroupLinear`.

    :class:`~brickwork.nn.ffn.DenseLayer` builds its own ``nn.Linear``; this brick takes the
    linear part as a sub-brick instead, so any (..., d_in) -> (..., d_out) module fits.

    Args:
        linear: the linear module.
        act: activation name.
        dropout: dropout probability on the output.

    Shapes:
        (..., d_in) -> (..., d_out)
    """

    def __init__(
        self, linear: nn.Module, act: Activation = "gelu", dropout: Annotated[float, pydantic.Field(ge=0, lt=1)] = 0.0
    ) -> None:
        super().__init__()
        self.linear = linear
        self.act_name = act
        self.act = activation(act)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.act(self.linear(x)))

    def permutation_symmetry(self) -> Symmetry:
        """The linear module's symmetry, its output observed after the (elementwise) activation."""
        children = {"linear": {"in": "in", "out": "out"}}
        return Symmetry(
            {"in": Perm(0), "out": Perm(0)}, probes=[Probe("", "out", -1)], inputs="in", output="out", children=children
        )
