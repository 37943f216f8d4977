"""Pre-norm residual wrapper around any position-wise brick."""

from __future__ import annotations

from torch import Tensor, nn

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
