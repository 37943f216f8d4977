"""Embedding evaluation: linear probe, WordSim Spearman, fidelity and FFN FLOP attribution."""

import numpy as np
import pytest
import torch
from torch import nn

from brickwork.analysis.embedding_eval import (
    EvalSets,
    embed,
    fidelity,
    module_flops,
    probe_accuracy,
    quality,
    wordsim_spearman,
)
from brickwork.nn import FeedForward, Stack, StackModel


def test_probe_accuracy_separates_separable_data_and_not_noise():
    g = torch.Generator().manual_seed(0)
    y = np.array([0, 1] * 50)
    x = torch.randn(100, 8, generator=g)
    assert probe_accuracy(x, y)[0] < 0.75  # labels unrelated to features
    x[:, 0] += torch.from_numpy(y).float() * 10
    assert probe_accuracy(x, y)[0] == pytest.approx(1.0)


def test_wordsim_spearman_and_fidelity():
    words = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [1.0, 1.0]])
    pairs = np.array([[0, 1], [0, 2], [0, 3]])
    assert wordsim_spearman(words, pairs, np.array([9.0, 1.0, 5.0])) == pytest.approx(1.0)
    assert wordsim_spearman(words, pairs, np.array([1.0, 9.0, 5.0])) == pytest.approx(-1.0)
    assert fidelity(words, words) == pytest.approx(1.0)
    assert fidelity(words, -words) == pytest.approx(-1.0)


def test_quality_against_a_reference():
    sets = EvalSets.build(
        [f"s{i}" for i in range(20)], [i % 2 for i in range(20)], [("a", "b", 3.0), ("a", "c", 1.0), ("b", "c", 2.0)]
    )
    assert sets.words == ["a", "b", "c"] and sets.pairs.tolist() == [[0, 1], [0, 2], [1, 2]]
    table = {t: torch.randn(4) for t in sets.texts + sets.words}
    emb = embed(lambda texts: torch.stack([table[t] for t in texts]), sets)
    q = quality(emb, sets, reference=emb)
    assert q["fidelity"] == pytest.approx(1.0) and q["fidelity_words"] == pytest.approx(1.0)
    assert set(q) == {"accuracy", "accuracy_std", "wordsim", "fidelity", "fidelity_words"}


def test_module_flops_counts_only_the_ffns():
    model = StackModel(nn.Identity(), Stack([nn.Sequential(nn.Linear(4, 4)), nn.Identity()]), nn.Linear(4, 2))
    model.body.layers[1].ffn = FeedForward(4, 8)
    model.body.layers[1] = _WithFFN(model.body.layers[1].ffn)
    cost = module_flops(model, [torch.randn(3, 5, 4)])
    assert cost["ffn_flops"] == 2 * 5 * (4 * 8 + 8 * 4)  # per sample: 5 tokens through up and down
    assert cost["flops"] == cost["ffn_flops"] + 2 * 5 * 4 * 4 + 2 * 5 * 4 * 2


class _WithFFN(nn.Module):
    def __init__(self, ffn: nn.Module) -> None:
        super().__init__()
        self.ffn = ffn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn(x)
