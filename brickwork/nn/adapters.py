"""Low-rank adapters over a frozen linear layer (LoRA, Hu et al., 2022).

Growing Transformers v2 (Bochkov, 2025, arXiv 2507.07129) grows a model one layer at a time on a
frozen substrate and, as depth increases, fine-tunes the whole frozen stack through LoRA. A
:class:`LoRALinear` wraps the frozen layer and adds ``(alpha / r) * B A x`` with ``B`` zero at
the start, so wrapping changes nothing until ``A`` and ``B`` are trained (bit-exact: the added
term is an exact zero).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class LoRALinear(nn.Module):
    """``base(x) + (alpha / rank) * x A^T B^T`` with the base layer frozen.

    Args:
        base: the linear layer to adapt (its parameters are set to ``requires_grad=False``).
        rank: r, the rank of the update ``B A`` (``A``: (r, d_in), ``B``: (d_out, r)).
        alpha: scale numerator; the update is multiplied by ``alpha / rank``.

    Shapes:
        (..., d_in) -> (..., d_out)
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float = 1.0) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRALinear: rank must be at least 1, got {rank}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=dev, dtype=dt))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=dev, dtype=dt))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear, and as the LoRA paper's code
        self.rank, self.alpha = rank, alpha

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + (self.alpha / self.rank) * ((x @ self.lora_a.t()) @ self.lora_b.t())

    def merged(self) -> nn.Linear:
        """A plain linear layer computing the same function (``W + (alpha / r) B A``), on a copy."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None)
        out = out.to(self.base.weight.device, self.base.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.base.weight + (self.alpha / self.rank) * self.lora_b @ self.lora_a)
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out
