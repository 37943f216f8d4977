"""Group-to-group 2-d convolution: channel groups connected by a group connectivity pattern.

The convolutional counterpart of :class:`~brickwork.nn.sparse.linear.GroupLinear`: input and
output channels are split into groups and output group ``o`` convolves only the k input
channel groups ``sources[o]``. Executed as one channel gather (``index_select``) followed by
one grouped convolution (``groups=G_out``), so only connected (output group, input group)
pairs are computed and counted. Block-diagonal connectivity with k = 1 is the ordinary grouped
convolution of ResNeXt / ShuffleNet; other patterns (ring, random, small-world, user-given)
let groups talk to more than their own slice without a dense convolution.
"""

from __future__ import annotations

import math
from typing import Annotated

import pydantic
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brickwork.nn.sparse.connectivity import Pattern, make_pattern
from brickwork.nn.sparse.linear import Fraction, in_degree
from brickwork.registry import register


@register("brick", "group_conv2d")
class GroupConv2d(nn.Module):
    """2-d convolution with sparse channel-group connectivity.

    Args:
        c_in: input channels; divisible by ``groups_in``.
        c_out: output channels; divisible by ``groups``.
        kernel_size: square kernel side.
        stride: convolution stride.
        padding: zero padding on each side.
        groups: output channel groups G_out.
        density: fraction of the dense convolution's weights kept (= k / G_in).
        groups_in: input channel groups G_in (default: ``groups``).
        pattern: block pattern when ``connectivity`` is None.
        connectivity: (G_out, k) long input groups of each output group (overrides the pattern).
        bias: learn a bias.

    Shapes:
        (B, c_in, H, W) -> (B, c_out, H', W')
    """

    sources: Tensor  # buffer, registered in __init__

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel_size: Annotated[int, pydantic.Field(ge=1)] = 3,
        stride: Annotated[int, pydantic.Field(ge=1)] = 1,
        padding: Annotated[int, pydantic.Field(ge=0)] = 1,
        groups: Annotated[int, pydantic.Field(ge=1)] = 4,
        density: Fraction = 0.5,
        groups_in: Annotated[int, pydantic.Field(ge=1)] | None = None,
        pattern: Pattern = "random",
        connectivity: Tensor | None = None,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        groups_in = groups_in or groups
        if c_in % groups_in or c_out % groups:
            raise ValueError(f"group_conv2d: channels {c_in} -> {c_out} are not divisible by {groups_in} -> {groups}")
        self.c_in, self.c_out, self.groups_in, self.groups_out = c_in, c_out, groups_in, groups
        self.block_in = c_in // groups_in
        self.stride, self.padding = stride, padding
        if connectivity is None:
            sources = make_pattern(pattern, groups, groups_in, in_degree(density, 1.0, groups_in))
        else:
            sources = connectivity.long().clone()
        in_range = sources.numel() > 0 and 0 <= int(sources.min()) and int(sources.max()) < groups_in
        if sources.shape[0] != groups or not in_range or any(len(set(r)) != len(r) for r in sources.tolist()):
            raise ValueError(
                f"group_conv2d: connectivity {tuple(sources.shape)} must be {groups} rows of distinct groups "
                f"in 0..{groups_in - 1}"
            )
        self.k = sources.shape[1]
        self.register_buffer("sources", sources.to(device))
        self.weight = nn.Parameter(
            torch.empty(c_out, self.k * self.block_in, kernel_size, kernel_size, device=device, dtype=dtype)
        )
        self.bias = nn.Parameter(torch.empty(c_out, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """As ``nn.Conv2d``: uniform with bound 1/sqrt(fan-in), fan-in = connected channels * kernel area."""
        bound = 1.0 / math.sqrt(self.weight[0].numel())
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def channel_index(self) -> Tensor:
        """(G_out * k * b_in,) input channels gathered, in the weight's input-channel order."""
        offsets = torch.arange(self.block_in, device=self.sources.device)
        return (self.sources[:, :, None] * self.block_in + offsets).reshape(-1)

    def forward(self, x: Tensor) -> Tensor:
        gathered = x.index_select(1, self.channel_index())
        return F.conv2d(gathered, self.weight, self.bias, self.stride, self.padding, groups=self.groups_out)

    @torch.no_grad()
    def dense_weight(self) -> Tensor:
        """(c_out, c_in, kh, kw) the equivalent dense kernel, zero for unconnected channel pairs."""
        kh, kw = self.weight.shape[2:]
        dense = self.weight.new_zeros(self.groups_out, self.c_out // self.groups_out, self.c_in, kh, kw)
        idx = self.channel_index().view(self.groups_out, 1, -1, 1, 1).expand(-1, dense.shape[1], -1, kh, kw)
        w = self.weight.detach().view(self.groups_out, -1, self.k * self.block_in, kh, kw)
        return dense.scatter_(2, idx, w).view(self.c_out, self.c_in, kh, kw)

    @property
    def density(self) -> float:
        """Fraction of the dense convolution's weights kept."""
        return self.k / self.groups_in

    def extra_repr(self) -> str:
        return (
            f"{self.c_in}, {self.c_out}, kernel={self.weight.shape[-1]}, stride={self.stride}, "
            f"groups={self.groups_in}->{self.groups_out}, k={self.k}"
        )
