"""Multi-head self-attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brickwork.nn.masking import PaddingMask
from brickwork.nn.permutation import Axis, Perm, Probe, Symmetry
from brickwork.registry import register


@register("brick", "attention")
class MultiHeadAttention(nn.Module):
    """Multi-head scaled dot-product self-attention (Vaswani et al., 2017).

    Uses :func:`torch.nn.functional.scaled_dot_product_attention`, which picks a fused
    kernel where one exists (flash / memory-efficient on CUDA).

    Args:
        dim: model width D; must be divisible by ``heads``.
        heads: number of heads.
        causal: mask attention to earlier positions (language models).
        dropout: attention-probability dropout during training.
        bias: add biases to the projections.
        padding: a shared :class:`PaddingMask`; padded keys are then not attended to.

    Shapes:
        (B, T, D) -> (B, T, D)
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        causal: bool = False,
        dropout: float = 0.0,
        bias: bool = True,
        padding: PaddingMask | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention: dim {dim} is not divisible by heads {heads}")
        kw = {"device": device, "dtype": dtype}
        self.heads = heads
        self.causal = causal
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias, **kw)
        self.out = nn.Linear(dim, dim, bias=bias, **kw)
        # A list hides the shared holder from module traversal (it is not this brick's child).
        self._padding = [padding] if padding is not None else []

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        # (B, T, 3D) -> 3 x (B, heads, T, D/heads)
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        mask = self._padding[0].mask if self._padding else None
        if mask is not None:
            mask = mask[:, None, None, :]  # (B, 1, 1, T): every query may see the real keys
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=self.causal, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(y.transpose(1, 2).reshape(b, t, d))

    def permutation_symmetry(self) -> Symmetry:
        """Heads permute as whole heads; inside each head, the q/k neurons together and the v/o neurons together.

        ``qk`` and ``vo`` are nested in ``heads``: (H, head_dim) permutations, so a head's q, k, v
        and output columns always move as one unit (git re-basin issue #6, ZipIt #31).
        """
        d = self.out.in_features
        hd = d // self.heads
        perms = {"in": Perm(d), "out": Perm(d), "heads": Perm(self.heads)}
        perms |= {"qk": Perm(hd, parent="heads"), "vo": Perm(hd, parent="heads")}
        axes = [Axis("qkv.weight", 1, "in"), Axis("out.weight", 0, "out"), Axis("out.weight", 1, "vo")]
        for t in ("qkv.weight",) + (("qkv.bias",) if self.qkv.bias is not None else ()):
            axes += [Axis(t, 0, "qk", 0), Axis(t, 0, "qk", d), Axis(t, 0, "vo", 2 * d)]
        if self.out.bias is not None:
            axes.append(Axis("out.bias", 0, "out"))
        probes = [Probe("qkv", "qk", -1), Probe("qkv", "qk", -1, offset=d), Probe("out", "vo", -1, input=True)]
        return Symmetry(perms, axes, probes, inputs="in", output="out")
