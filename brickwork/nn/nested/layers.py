"""Linear, convolution and norm bricks usable at any prefix width, and nested versions of the
standard MLP / CNN / FFN bricks built from them.

A nested brick keeps its full-size parameters and reads ``self.width`` (a fraction in (0, 1],
set model-wide by :meth:`brickwork.nn.nested.NestedModel.configure`): at width ``w`` a nested
output dimension of size ``n`` uses its first ``units(w, n)`` units (SortedNet, Valipour et
al., 2023; slimmable networks, Yu et al., 2019). A nested *input* dimension takes its size from
the input, so producer and consumer agree by construction. ``sliced(width)`` returns a
standalone brick of the same class with genuinely smaller, copied parameters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brickwork.nn.conv import ConvBlock
from brickwork.nn.embed import FlattenEmbed
from brickwork.nn.ffn import Activation, DenseLayer, FeedForward
from brickwork.nn.heads import ClassifierHead, Pool
from brickwork.nn.nested.functional import sliced_conv2d, sliced_linear, units
from brickwork.registry import register

Device = torch.device | str | None


@register("brick", "nested_linear")
class NestedLinear(nn.Module):
    """``y = x W[:o, :i]^T + b[:o]``: a linear layer whose first rows/columns form every smaller one.

    Args:
        in_features: full input width I.
        out_features: full output width O.
        bias: learn a bias.
        nest_in: the input width follows the input (a prefix of I); False requires all I.
        nest_out: the output width is ``units(self.width, O)``; False always gives all O.
        inplace_grad: accumulate sliced gradients in place (see :mod:`.functional`).

    Shapes:
        (..., i) -> (..., o)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        nest_in: bool = True,
        nest_out: bool = True,
        inplace_grad: bool = True,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.nest_in, self.nest_out, self.inplace_grad = nest_in, nest_out, inplace_grad
        self.width = 1.0
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        # nn.Linear's default initialisation, at the full fan-in.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def active(self, width: float) -> tuple[int, int]:
        """(out, in) sizes at ``width``."""
        o = units(width, self.out_features) if self.nest_out else self.out_features
        i = units(width, self.in_features) if self.nest_in else self.in_features
        return o, i

    def forward(self, x: Tensor) -> Tensor:
        o = units(self.width, self.out_features) if self.nest_out else self.out_features
        i = x.shape[-1] if self.nest_in else self.in_features
        return sliced_linear(x, self.weight, self.bias, o, i, inplace_grad=self.inplace_grad)

    @torch.no_grad()
    def sliced(self, width: float) -> NestedLinear:
        o, i = self.active(width)
        new = NestedLinear(
            i,
            o,
            self.bias is not None,
            self.nest_in,
            self.nest_out,
            self.inplace_grad,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        new.weight.copy_(self.weight[:o, :i])
        if self.bias is not None and new.bias is not None:
            new.bias.copy_(self.bias[:o])
        return new

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, nest_in={self.nest_in}, nest_out={self.nest_out}"


@register("brick", "nested_conv2d")
class NestedConv2d(nn.Module):
    """A 2D convolution whose first output/input channels form every narrower one.

    Args:
        c_in: full input channels.
        c_out: full output channels.
        kernel_size, stride, padding: as in :class:`torch.nn.Conv2d` (square).
        bias: learn a bias.
        nest_in: input channels follow the input; nest_out: output channels are
            ``units(self.width, c_out)``.

    Shapes:
        (B, c, H, W) -> (B, o, H', W')
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 1,
        bias: bool = True,
        nest_in: bool = True,
        nest_out: bool = True,
        inplace_grad: bool = True,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.c_in, self.c_out, self.kernel_size, self.stride, self.padding = c_in, c_out, kernel_size, stride, padding
        self.nest_in, self.nest_out, self.inplace_grad = nest_in, nest_out, inplace_grad
        self.width = 1.0
        ref = nn.Conv2d(c_in, c_out, kernel_size, stride, padding, bias=bias, device=device, dtype=dtype)
        self.weight = ref.weight  # nn.Conv2d's default initialisation
        self.bias = ref.bias

    def active(self, width: float) -> tuple[int, int]:
        o = units(width, self.c_out) if self.nest_out else self.c_out
        i = units(width, self.c_in) if self.nest_in else self.c_in
        return o, i

    def forward(self, x: Tensor) -> Tensor:
        o = units(self.width, self.c_out) if self.nest_out else self.c_out
        i = x.shape[1] if self.nest_in else self.c_in
        return sliced_conv2d(x, self.weight, self.bias, o, i, self.stride, self.padding, inplace_grad=self.inplace_grad)

    @torch.no_grad()
    def sliced(self, width: float) -> NestedConv2d:
        o, i = self.active(width)
        new = NestedConv2d(
            i,
            o,
            self.kernel_size,
            self.stride,
            self.padding,
            self.bias is not None,
            self.nest_in,
            self.nest_out,
            self.inplace_grad,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        new.weight.copy_(self.weight[:o, :i])
        if self.bias is not None and new.bias is not None:
            new.bias.copy_(self.bias[:o])
        return new


@register("brick", "nested_group_norm")
class NestedGroupNorm(nn.Module):
    """One-group GroupNorm (LayerNorm over C, H, W) over however many channels the input has.

    Its statistics are per sample, so every width shares it exactly; BatchNorm would need
    separate running statistics per width (switchable BN of slimmable networks).

    Shapes:
        (B, c, H, W) -> (B, c, H, W), c <= channels
    """

    def __init__(
        self, channels: int, eps: float = 1e-5, device: Device = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.channels, self.eps = channels, eps
        self.width = 1.0  # its channels follow the input; kept for the nested-brick protocol
        self.weight = nn.Parameter(torch.ones(channels, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(channels, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        c = x.shape[1]
        return F.group_norm(x, 1, self.weight[:c], self.bias[:c], self.eps)

    @torch.no_grad()
    def sliced(self, width: float) -> NestedGroupNorm:
        c = units(width, self.channels)
        new = NestedGroupNorm(c, self.eps, device=self.weight.device, dtype=self.weight.dtype)
        new.weight.copy_(self.weight[:c])
        new.bias.copy_(self.bias[:c])
        return new


def _swap(module: nn.Module, **children: nn.Module) -> nn.Module:
    """Replace sub-modules of a standard brick by nested ones (its forward only calls them).

    Keeping the standard bricks' forward and parameter names means a nested model at full
    width has the state-dict layout of its standard counterpart (tested).
    """
    for name, child in children.items():
        if not isinstance(getattr(module, name, None), nn.Module):
            raise AttributeError(f"{type(module).__name__} has no sub-module {name!r} to make nested")
        setattr(module, name, child)
    return module


def nested_flatten_embed(in_features: int, dim: int) -> FlattenEmbed:
    """:class:`FlattenEmbed` whose output width is nested. (B, *in_shape) -> (B, units(w, dim))."""
    return _swap(FlattenEmbed(1, 1), proj=NestedLinear(in_features, dim, nest_in=False))  # type: ignore[return-value]


def nested_dense_layer(d_in: int, d_out: int, act: Activation = "gelu", dropout: float = 0.0) -> DenseLayer:
    """:class:`DenseLayer` nested in both widths. (..., i) -> (..., units(w, d_out))."""
    return _swap(DenseLayer(1, 1, act=act, dropout=dropout), linear=NestedLinear(d_in, d_out))  # type: ignore[return-value]


def nested_feed_forward(
    dim: int, hidden: int, act: Activation = "gelu", glu: bool = False, dropout: float = 0.0, bias: bool = True
) -> FeedForward:
    """:class:`FeedForward` with a nested hidden width (its first neurons form every smaller FFN).

    Shapes:
        (..., D) -> (..., D); D is not nested.
    """
    ffn = FeedForward(1, 1, act=act, glu=glu, dropout=dropout, bias=bias)
    subs = {
        "up": NestedLinear(dim, hidden, bias, nest_in=False),
        "down": NestedLinear(hidden, dim, bias, nest_out=False),
    }
    if glu:
        subs["gate"] = NestedLinear(dim, hidden, bias, nest_in=False)
    return _swap(ffn, **subs)  # type: ignore[return-value]


def nested_conv_block(c_in: int, c_out: int, stride: int = 1, norm: str = "group", nest_in: bool = True) -> ConvBlock:
    """:class:`ConvBlock` (3x3 conv, norm, ReLU) with nested channels; ``norm`` is ``group`` or ``none``."""
    if norm not in ("group", "none"):
        raise ValueError(
            f"nested conv blocks support norm 'group' or 'none', not {norm!r}: batch statistics "
            "differ per width (slimmable networks need one BatchNorm per width)"
        )
    conv = NestedConv2d(c_in, c_out, 3, stride, 1, bias=norm == "none", nest_in=nest_in)
    block = ConvBlock(1, 1, norm="none")
    return _swap(block, conv=conv, norm=NestedGroupNorm(c_out) if norm == "group" else nn.Identity())  # type: ignore[return-value]


def nested_classifier_head(dim: int, num_classes: int, pool: Pool = "none") -> ClassifierHead:
    """:class:`ClassifierHead` (no norm) reading a nested-width input. (B, d) | (B, c, H, W) -> (B, K)."""
    return _swap(ClassifierHead(1, 1, pool=pool), proj=NestedLinear(dim, num_classes, nest_out=False))  # type: ignore[return-value]
