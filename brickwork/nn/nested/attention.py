"""Multi-head self-attention whose first heads form every narrower attention."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brickwork.nn.nested.functional import sliced_linear, units
from brickwork.registry import register


@register("brick", "nested_attention")
class NestedAttention(nn.Module):
    """Self-attention at any prefix of its heads (SortedNet's nested attention heads).

    The fused QKV projection is stored head-major, rows ``[h0: q k v, h1: q k v, ...]``,
    rather than ``[q h0 h1 ..., k ..., v ...]`` as in
    :class:`~brickwork.nn.attention.MultiHeadAttention`, so that the first ``h`` heads are one
    contiguous block of rows (a view, no gather); the output projection uses the first
    ``h * head_dim`` columns. The model width D is not nested.

    Args:
        dim: model width D.
        heads: full number of heads H; ``units(self.width, H)`` are active.
        head_dim: width of each head (default D / H).
        causal: mask attention to earlier positions.
        dropout: attention-probability dropout while training.
        bias: biases on the projections.

    Shapes:
        (B, T, D) -> (B, T, D)
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int | None = None,
        causal: bool = False,
        dropout: float = 0.0,
        bias: bool = True,
        inplace_grad: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if head_dim is None:
            if dim % heads:
                raise ValueError(f"nested_attention: dim {dim} is not divisible by heads {heads}; give head_dim")
            head_dim = dim // heads
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.dim, self.heads, self.head_dim = dim, heads, head_dim
        self.causal, self.dropout, self.inplace_grad = causal, dropout, inplace_grad
        self.width = 1.0
        inner = heads * head_dim
        self.qkv_weight = nn.Parameter(torch.empty(3 * inner, dim, **kw))
        self.qkv_bias = nn.Parameter(torch.zeros(3 * inner, **kw)) if bias else None
        self.out_weight = nn.Parameter(torch.empty(dim, inner, **kw))
        self.out_bias = nn.Parameter(torch.zeros(dim, **kw)) if bias else None
        nn.init.kaiming_uniform_(self.qkv_weight, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.out_weight, a=math.sqrt(5))

    def active_heads(self, width: float | None = None) -> int:
        return units(self.width if width is None else width, self.heads)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        h, e = self.active_heads(), self.head_dim
        qkv = sliced_linear(x, self.qkv_weight, self.qkv_bias, 3 * h * e, self.dim, inplace_grad=self.inplace_grad)
        # (B, T, h, 3, E) -> 3 x (B, h, T, E)
        q, k, v = qkv.view(b, t, h, 3, e).permute(3, 0, 2, 1, 4)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=self.causal, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).reshape(b, t, h * e)
        return sliced_linear(y, self.out_weight, self.out_bias, self.dim, h * e, inplace_grad=self.inplace_grad)

    @torch.no_grad()
    def sliced(self, width: float) -> NestedAttention:
        h, e = self.active_heads(width), self.head_dim
        new = NestedAttention(
            self.dim,
            h,
            e,
            self.causal,
            self.dropout,
            self.qkv_bias is not None,
            self.inplace_grad,
            device=self.qkv_weight.device,
            dtype=self.qkv_weight.dtype,
        )
        new.qkv_weight.copy_(self.qkv_weight[: 3 * h * e])
        new.out_weight.copy_(self.out_weight[:, : h * e])
        if self.qkv_bias is not None:
            assert new.qkv_bias is not None and new.out_bias is not None and self.out_bias is not None
            new.qkv_bias.copy_(self.qkv_bias[: 3 * h * e])
            new.out_bias.copy_(self.out_bias)
        return new

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, head_dim={self.head_dim}, causal={self.causal}"
