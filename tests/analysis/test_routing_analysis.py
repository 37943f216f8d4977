"""Routing analysis: summaries, expert specialisation per class, heatmap PNG."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from brickwork.analysis.routing import (
    class_expert_counts,
    expert_specialisation,
    plot_routing_heatmap,
    routing_stats,
    routing_summary,
    token_labels,
)
from brickwork.nn.moe import MoE, moe_ffn
from brickwork.nn.routing import GroupedFFNExperts, MoESettings, TopKRouter
from brickwork.nn.routing.types import RoutingRecord


def _class_routed_model() -> MoE:
    """A top-1 MoE whose router sends class c (feature c is large) to expert c."""
    router = TopKRouter(4, 4, top_k=1)
    with torch.no_grad():
        router.proj.weight.copy_(torch.eye(4) * 10)
    return MoE(GroupedFFNExperts(4, 4, 8), router)


def _batches(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        labels = torch.randint(0, 3, (5,), generator=g)  # classes 0-2 of 4; expert 3 never used
        x = torch.randn(5, 6, 4, generator=g) * 0.1 + nn.functional.one_hot(labels, 4)[:, None, :] * 2.0
        out.append((x, labels))
    return out


def test_specialisation_recovers_class_to_expert_map() -> None:
    model = nn.Sequential(_class_routed_model())
    spec = expert_specialisation(model, _batches(), num_classes=4)
    assert set(spec) == {"0"}
    m = spec["0"]
    assert m.shape == (4, 4)
    torch.testing.assert_close(m[:3], torch.eye(4, dtype=torch.float64)[:3])
    torch.testing.assert_close(m[3], torch.zeros(4, dtype=torch.float64))  # class 3 never seen
    assert model.training  # mode restored


def test_class_expert_counts_and_token_labels() -> None:
    moe = _class_routed_model()
    x, labels = _batches(1)[0]
    moe(x)
    assert moe.record is not None
    per_token = token_labels(moe.record, labels)
    assert per_token.shape == (30,) and torch.equal(per_token[:6], labels[0].repeat(6))
    counts = class_expert_counts(moe.record, labels, 4)
    assert int(counts.sum()) == 30
    assert torch.equal(counts.diagonal()[:3], torch.bincount(labels, minlength=4)[:3] * 6)
    with pytest.raises(ValueError):
        token_labels(moe.record, torch.zeros(7, dtype=torch.long))


def test_routing_summary() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        moe_ffn(8, 12, 4, MoESettings(top_k=2, capacity_factor=0.5)), moe_ffn(8, 12, 4, MoESettings(router="hash"))
    )
    model(torch.randn(3, 4, 8))
    summary = routing_summary(model)
    assert set(summary) == {"0", "1"}
    s0 = summary["0"]
    assert int(s0.load.sum()) <= 24 and s0.load.max() <= 3  # C = ceil(0.5 * 24 / 4) = 3
    assert s0.drop_rate == pytest.approx(1 - int(s0.load.sum()) / 24)
    assert s0.entropy is not None and 0 < s0.entropy <= torch.log(torch.tensor(4.0)).item() + 1e-6
    assert float(s0.load_fraction.sum()) == pytest.approx(1.0)
    assert summary["1"].entropy is None and summary["1"].drop_rate == 0.0
    assert int(summary["1"].load.sum()) == 24 and summary["1"].unrouted_tokens == 0  # 12 tokens x k = 2, dropless


def test_heatmap_png(tmp_path: Path) -> None:
    matrix = torch.rand(5, 8)
    path = plot_routing_heatmap(matrix, tmp_path / "sub" / "spec.png", title="layer 0")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_routing_stats_of_a_hand_made_record() -> None:
    """Every statistic against its value worked out by hand: 4 tokens, 3 experts, top-2, one
    assignment dropped by capacity, expert 2 dead."""
    probs = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.25, 0.25, 0.5], [0.5, 0.5, 0.0]])
    record = RoutingRecord(
        num_tokens=4,
        num_experts=3,
        leading_shape=(2, 2),
        token_idx=torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]),
        expert_idx=torch.tensor([0, 1, 0, 1, 0, 1, 0, 1]),
        weights=torch.full((8,), 0.5),
        kept=torch.tensor([True, True, True, True, True, True, False, False]),  # token 3 lost both
        load=torch.tensor([3, 3, 0]),
        capacity=3,
        probs=probs,
    )
    s = routing_stats(record)
    assert s.imbalance == 3 / 2  # max 3 over mean 2
    assert s.drop_rate == 2 / 8 and s.unrouted_tokens == 1 and s.dead_experts == 1
    assert torch.equal(s.load_fraction, torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))
    ln2 = math.log(2)
    assert s.entropy == pytest.approx((ln2 + 0.0 + 1.5 * ln2 + ln2) / 4, abs=1e-12)  # H(1/4, 1/4, 1/2) = 1.5 ln 2
