"""Mixture-of-depths: capacity, identity for skipped tokens, router gradient, FLOPs, p-MoD schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from brickwork.analysis.compute import FlopMeter
from brickwork.nn.attention import MultiHeadAttention
from brickwork.nn.ffn import FeedForward
from brickwork.nn.mod import MixtureOfDepths, mod_transformer_block, pmod_capacities
from brickwork.nn.transformer import TransformerBlock


class Residual(nn.Module):
    def __init__(self, f: nn.Module) -> None:
        super().__init__()
        self.f = f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x)


def test_capacity_and_skipped_tokens_are_identity() -> None:
    torch.manual_seed(0)
    block = Residual(FeedForward(8, 16))
    mod = MixtureOfDepths(block, 8, capacity=0.25)
    x = torch.randn(3, 10, 8)
    y = mod(x)
    rec = mod.record
    assert rec is not None and rec.capacity == math.ceil(0.25 * 10) == 3
    assert rec.selected.shape == (3, 3)
    assert torch.all(rec.selected[:, 1:] > rec.selected[:, :-1])  # original order kept
    logits = mod.router(x).squeeze(-1)
    for b in range(3):
        chosen = set(rec.selected[b].tolist())
        assert chosen == set(logits[b].topk(3).indices.tolist())  # top-C per sequence
        for t in range(10):
            if t in chosen:
                expected = x[b, t] + logits[b, t] * (block(x[b, t][None])[0] - x[b, t])
            else:
                expected = x[b, t]
            torch.testing.assert_close(y[b, t], expected)


def test_router_and_block_get_gradient() -> None:
    torch.manual_seed(0)
    for weight in ("linear", "sigmoid", "tanh"):
        mod = mod_transformer_block(8, 2, 16, capacity=0.5, weight=weight, causal_aux=True).train()  # type: ignore[arg-type]
        y = mod(torch.randn(2, 6, 8))
        (y.square().mean() + sum(mod.aux_losses.values())).backward()
        for name, p in mod.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{weight}: {name}"
    assert set(mod.aux_losses) == {"mod_topk_bce"}


def test_string_reweights_skipped_tokens() -> None:
    torch.manual_seed(0)
    block = Residual(FeedForward(8, 16))
    mod = MixtureOfDepths(block, 8, capacity=0.5, weight="tanh", tanh_scale=0.2, reweight_skipped=True)
    x = torch.randn(1, 6, 8)
    y = mod(x)
    assert mod.record is not None
    w = 1 + 0.2 * torch.tanh(mod.router(x).squeeze(-1))
    sel = set(mod.record.selected[0].tolist())
    for t in range(6):
        if t in sel:
            expected = x[0, t] + w[0, t] * (block(x[0, t][None])[0] - x[0, t])
        else:
            expected = w[0, t] * x[0, t]
        torch.testing.assert_close(y[0, t], expected)
    with pytest.raises(ValueError):
        MixtureOfDepths(block, 8, reweight_skipped=True)  # linear weights are not near 1


def test_flops_count_only_processed_tokens() -> None:
    torch.manual_seed(0)
    d, t, b = 8, 16, 2
    block = TransformerBlock(d, MultiHeadAttention(d, 2), FeedForward(d, 32))
    mod = MixtureOfDepths(block, d, capacity=0.25).eval()
    c = mod.tokens_processed(t)
    x = torch.randn(b, t, d)
    with torch.no_grad():
        full, part, routed = FlopMeter(), FlopMeter(), FlopMeter()
        with full:
            block(x)
        with part:
            block(x[:, :c])
        with routed:
            mod(x)
    router_flops = 2 * b * t * d
    assert routed.total == part.total + router_flops
    assert routed.total < full.total


def test_pmod_capacities_shifted_cosine() -> None:
    caps = pmod_capacities(8, mean=0.5, schedule="cosine", min_capacity=0.1)
    assert len(caps) == 8
    assert caps[0] == pytest.approx(1.0) and caps[-1] == pytest.approx(0.1)  # 0.5 + 0.5, max(0.1, 0.5 - 0.5)
    assert all(a >= b for a, b in zip(caps, caps[1:], strict=False))
    assert caps[3] == pytest.approx(0.5 + 0.5 * math.cos(math.pi * 3 / 7))
    lin = pmod_capacities(5, mean=0.4, schedule="linear")
    assert lin == pytest.approx([0.9, 0.65, 0.4, 0.15, 1e-6])
    dense_first = pmod_capacities(5, mean=0.4, dense_above=0.6)
    assert dense_first[0] == 1.0 and dense_first[1] == 1.0 and dense_first[2] == pytest.approx(0.4)


def test_mod_rejects_bad_capacity() -> None:
    with pytest.raises(ValueError):
        MixtureOfDepths(nn.Identity(), 8, capacity=0.0)
