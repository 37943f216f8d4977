"""Mixture-of-depths properties the first tests left open (found by mutation testing): the papers'
defaults, every router weight by hand in float64, the edges of the capacity, the auxiliary loss
only in training, parameters on the device asked for."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from brickwork.nn.mod import MixtureOfDepths, mod_transformer_block, pmod_capacities


class Shift(nn.Module):
    """A block whose update is known: ``block(x) - x = tanh(x) + 1``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(x) + 1


def test_defaults_are_the_papers() -> None:
    """Raposo et al. route 12.5 % of the tokens; p-MoD's TanhNorm uses s = 0.2 and its PRD a
    shift of 0.5 (capacity from 1.0 at the first layer to 0 at the last)."""
    mod = inspect.signature(MixtureOfDepths).parameters
    assert mod["capacity"].default == 0.125 and mod["tanh_scale"].default == 0.2 and mod["weight"].default == "linear"
    assert inspect.signature(mod_transformer_block).parameters["capacity"].default == 0.125
    assert pmod_capacities(3) == [1.0, 0.5, 1e-6]  # mean 0.5, cosine, clipped at the floor


@pytest.mark.parametrize("weight", ["linear", "sigmoid", "tanh"])
def test_processed_tokens_get_the_weighted_update_by_hand(weight: str) -> None:
    torch.manual_seed(0)
    mod = MixtureOfDepths(Shift(), 4, capacity=0.5, weight=weight, dtype=torch.float64)  # type: ignore[arg-type]
    x = torch.randn(2, 6, 4, dtype=torch.float64)
    y = mod(x)
    assert y.dtype == torch.float64
    r = mod.router(x).squeeze(-1)
    w = {"linear": r, "sigmoid": torch.sigmoid(r), "tanh": 1 + 0.2 * torch.tanh(r)}[weight]
    chosen = torch.zeros_like(r, dtype=torch.bool).scatter_(1, r.topk(3, dim=1).indices, True)
    expected = torch.where(chosen[..., None], x + w[..., None] * (torch.tanh(x) + 1), x)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("capacity", "seq_len", "c"), [(0.125, 3, 1), (0.125, 16, 2), (0.3, 10, 3), (0.31, 10, 4)])
def test_tokens_processed_is_ceil_at_least_one(capacity: float, seq_len: int, c: int) -> None:
    assert MixtureOfDepths(Shift(), 4, capacity=capacity).tokens_processed(seq_len) == c


def test_full_capacity_is_accepted_and_processes_every_token() -> None:
    torch.manual_seed(0)
    mod = MixtureOfDepths(Shift(), 4, capacity=1.0, weight="sigmoid", dtype=torch.float64)
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    w = torch.sigmoid(mod.router(x))
    torch.testing.assert_close(mod(x), x + w * (torch.tanh(x) + 1), rtol=0, atol=1e-12)
    assert mod.record is not None and mod.record.capacity == 5


def test_causal_aux_loss_only_in_training_and_by_hand() -> None:
    torch.manual_seed(0)
    mod = MixtureOfDepths(Shift(), 4, capacity=0.5, causal_aux=True)
    x = torch.randn(2, 6, 4)
    mod.eval()(x)
    assert mod.aux_losses == {}
    mod.train()(x)
    r = mod.router(x).squeeze(-1)
    target = torch.zeros_like(r).scatter_(1, r.topk(3, dim=1).indices, 1.0)
    torch.testing.assert_close(mod.aux_losses["mod_topk_bce"], F.binary_cross_entropy_with_logits(r, target))
    plain = MixtureOfDepths(Shift(), 4, capacity=0.5).train()
    plain(x)
    assert plain.aux_losses == {}  # without causal_aux: no loss


def test_router_is_built_on_the_device_asked_for() -> None:
    mod = MixtureOfDepths(Shift(), 4, device="meta")
    assert mod.router.weight.device.type == "meta"


def test_bad_shapes_and_settings_say_what_was_expected() -> None:
    with pytest.raises(ValueError, match=r"expects \(B, T, D\), got \(2, 4\)"):
        MixtureOfDepths(Shift(), 4)(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"capacity must be in \(0, 1\], got 1.5"):
        MixtureOfDepths(Shift(), 4, capacity=1.5)
    with pytest.raises(ValueError, match="reweight_skipped needs weight='tanh'"):
        MixtureOfDepths(Shift(), 4, reweight_skipped=True)


def test_pmod_capacities_by_hand() -> None:
    s = math.sqrt(0.5) / 2
    assert pmod_capacities(5) == pytest.approx([1.0, 0.5 + s, 0.5, 0.5 - s, 1e-6], abs=1e-15)
    assert pmod_capacities(5, schedule="linear") == pytest.approx([1.0, 0.75, 0.5, 0.25, 1e-6], abs=1e-15)
    assert pmod_capacities(5, dense_above=0.8) == pytest.approx([1.0, 1.0, 0.5, 0.5 - s, 1e-6], abs=1e-15)
    assert pmod_capacities(5, min_capacity=0.2) == pytest.approx([1.0, 0.5 + s, 0.5, 0.2, 0.2], abs=1e-15)
    assert pmod_capacities(1) == [1.0] and pmod_capacities(2, mean=0.6) == pytest.approx([1.0, 0.1])
