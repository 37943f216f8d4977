"""gamma-MoD's ARank: attention-map rank per layer, and the choice of the lowest-rank layers."""

import pytest
import torch

from brickwork.analysis.arank import arank_mod_layers, attention_ranks
from brickwork.nn import MultiHeadAttention


class TwoLayers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = MultiHeadAttention(8, 2)
        self.b = MultiHeadAttention(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)  # both layers see the input itself


def test_arank_is_the_rank_of_the_maps_and_picks_the_redundant_layer() -> None:
    torch.manual_seed(0)
    m = TwoLayers().double()
    with torch.no_grad():
        m.a.qkv.weight[:16].zero_()  # queries and keys zero: every row of every map uniform -> rank 1
        m.a.qkv.bias.zero_()
        m.b.qkv.weight[:16] *= 3.0  # input-dependent (not one-hot) maps: full rank T
    x = torch.randn(3, 6, 8, dtype=torch.float64)
    ranks = attention_ranks(m, x)
    assert list(ranks) == ["a", "b"]
    assert ranks["a"] == 1.0 and ranks["b"] == 6.0
    assert arank_mod_layers(list(ranks.values()), 1) == [0]  # the rank-1 layer becomes MoD
    assert m.training  # modes restored


def test_causal_maps_are_lower_triangular_and_full_rank() -> None:
    torch.manual_seed(0)
    attn = MultiHeadAttention(8, 2, causal=True).double()
    ranks = attention_ranks(attn, torch.randn(2, 5, 8, dtype=torch.float64))
    assert ranks[""] == 5.0  # a lower-triangular softmax map has a positive diagonal


def test_choice_of_layers() -> None:
    assert arank_mod_layers([5.0, 2.0, 7.0, 2.0], 2) == [1, 3]
    assert arank_mod_layers([5.0, 2.0, 7.0, 2.0], 0) == []
    with pytest.raises(ValueError, match="num_mod"):
        arank_mod_layers([1.0], 2)
