"""Pre-norm residual wrapper around any position-wise brick."""

from __future__ import annotations

from torch import Tensor, nn

from brickwork.nn.permutation import Perm, Probe, Symmetry
from brickwork.registry import register


@register("brick", "residual_ffn")
class ResidualFFN(nn.Module):
    """``x + ffn(norm(x))``: the FFN half of a pre-norm transformer block, for MLP stacks.

    The FFN is a sub-brick, so a dense :class:`~brickwork.nn.ffn.FeedForward`, a mixture of
    experts or a sparse FFN drop in without a flag.

    Args:
        dim: width D.
        ffn: (..., D) -> (..., D).

    Shapes:
        (..., D) -> (..., D)
    """

    def __init__(self, dim: int, ffn: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.ffn = ffn

    def forward(self, x: Tensor) -> Tensor:
        return x + self.ffn(self.norm(x))

    def permutation_symmetry(self) -> Symmetry:
        """The residual stream is one permutation for input, output, the norm and the FFN's ends."""
        both = {"in": "stream", "out": "stream"}
        dim = self.norm.normalized_shape[0]
        return Symmetry(
            {"stream": Perm(dim)},
            probes=[Probe("", "stream", -1)],
            inputs="stream",
            output="stream",
            children={"norm": both, "ffn": both},
        )
