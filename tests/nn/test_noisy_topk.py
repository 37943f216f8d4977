"""Shazeer et al.'s noisy top-k gate: the smooth load estimator against Monte Carlo, the losses, the init."""

import math

import pytest
import torch

from brickwork.nn import moe_ffn
from brickwork.nn.routing import MoESettings, NoisyTopKRouter, cv_squared, smooth_load


def test_smooth_load_matches_monte_carlo_of_top_k_membership() -> None:
    # P(x, i): with the other experts' noisy logits fixed, resample expert i's noise only and
    # count how often i lands in the top k of the whole noisy vector.
    gen = torch.Generator().manual_seed(0)
    n, e, k, draws = 4, 6, 2, 40_000
    clean = torch.randn(n, e, generator=gen, dtype=torch.float64)
    std = 0.5 + torch.rand(n, e, generator=gen, dtype=torch.float64)
    noisy = clean + torch.randn(n, e, generator=gen, dtype=torch.float64) * std
    p = smooth_load(clean, noisy, std, k)
    # own[t, i, d]: expert i's noisy logit redrawn (draw d); i is in the top k when fewer than k
    # of the other experts' (fixed) noisy logits beat it
    own = clean[:, :, None] + torch.randn(n, e, draws, generator=gen, dtype=torch.float64) * std[:, :, None]
    beats = noisy[:, None, None, :] > own[..., None]  # (n, e, draws, e): expert j beats redrawn i
    beats &= ~torch.eye(e, dtype=torch.bool)[None, :, None, :]
    mc = (beats.sum(-1) < k).double().mean(-1)
    # binomial standard error at most 0.5 / sqrt(draws) = 0.0025; allow 5 of them
    assert float((p - mc).abs().max()) < 1.25e-2
    assert int(((p > 0.1) & (p < 0.9)).sum()) >= 6  # enough non-trivial probabilities to test


def test_cv_squared_is_the_population_variance_over_the_squared_mean() -> None:
    v = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)
    assert float(cv_squared(v)) == pytest.approx(3.5 / 9.0, rel=1e-9)  # var 3.5, mean 3
    assert float(cv_squared(torch.tensor([2.0]))) == 0.0


def test_init_gate_and_losses_as_the_paper() -> None:
    torch.manual_seed(0)
    r = NoisyTopKRouter(5, 4, top_k=2).double()
    assert not r.w_gate.any() and not r.w_noise.any()  # appendix A: both start at zero
    with torch.no_grad():
        r.w_gate.normal_()
        r.w_noise.normal_()
    x = torch.randn(7, 5, dtype=torch.float64)
    torch.manual_seed(1)
    out = r.train()(x)
    # Reproduce eq. 4 with the same noise draw, then eqs. 5-7 and 10-11 by hand.
    torch.manual_seed(1)
    clean = x @ r.w_gate
    std = torch.nn.functional.softplus(x @ r.w_noise) + r.noise_floor
    h = clean + torch.randn(clean.shape, dtype=torch.float64) * std  # router precision: float64 stays float64
    val, idx = h.topk(2, dim=-1)
    gates = torch.zeros_like(h).scatter(-1, idx, torch.softmax(val, -1))
    assert torch.equal(out.expert_idx.view(7, 2), idx)
    torch.testing.assert_close(out.weights.view(7, 2), torch.softmax(val, -1), rtol=1e-6, atol=1e-7)
    imp = gates.sum(0)
    torch.testing.assert_close(out.aux_losses["importance"].double(), imp.var(unbiased=False) / imp.mean() ** 2)
    load = smooth_load(clean, h, std, 2).sum(0)
    torch.testing.assert_close(out.aux_losses["load"].double(), load.var(unbiased=False) / load.mean() ** 2)
    # the load loss is smooth: it trains the noise weights too
    out.aux_losses["load"].backward()
    assert r.w_noise.grad is not None and r.w_noise.grad.abs().sum() > 0
    # evaluation: no noise, no losses
    ev = r.eval()(x)
    assert ev.aux_losses == {} and torch.equal(ev.expert_idx.view(7, 2), clean.topk(2, -1).indices)


def test_noisy_topk_through_the_settings() -> None:
    x = torch.randn(2, 3, 8)
    m = moe_ffn(8, 12, 4, MoESettings(router="noisy_topk", top_k=2)).train()
    m(x)
    assert isinstance(m.router, NoisyTopKRouter) and set(m.aux_losses) == {"importance", "load"}
    off = moe_ffn(8, 12, 4, MoESettings(router="noisy_topk", balance="none")).train()
    off(x)
    assert off.aux_losses == {}


def test_defaults_and_the_range_of_k() -> None:
    """k = 2 and the tensor2tensor noise floor 1e-2 by default; k = 1 and k = E are valid (k = E
    runs every expert: its load is the token count), k = 0 and k > E are refused."""
    r = NoisyTopKRouter(5, 4)
    assert (r.top_k, r.noise_floor) == (2, 1e-2)
    x = torch.randn(6, 5)
    assert NoisyTopKRouter(5, 4, top_k=1)(x).num_assignments == 6
    every = NoisyTopKRouter(5, 4, top_k=4).train()
    out = every(x)
    assert out.num_assignments == 24 and torch.equal(out.aux_sums["load"], torch.full((4,), 6.0))
    for k in (0, 5):
        with pytest.raises(ValueError, match=rf"^NoisyTopKRouter: top_k must be in \[1, 4\], got {k}$"):
            NoisyTopKRouter(5, 4, top_k=k)


def test_the_noise_floor_is_added_to_the_noise_scale() -> None:
    """With W_noise = 0 the noise scale is softplus(0) + floor = ln 2 + floor: the default floor
    1e-2 and another one give the load estimator's Phi((clean - threshold) / std) with that std."""
    torch.manual_seed(0)
    x = torch.randn(7, 5, dtype=torch.float64)
    for floor in (None, 0.5):
        r = NoisyTopKRouter(5, 4, top_k=2) if floor is None else NoisyTopKRouter(5, 4, top_k=2, noise_floor=floor)
        r = r.double().train()
        with torch.no_grad():
            r.w_gate.normal_()
        std = torch.full((7, 4), math.log(2.0) + (1e-2 if floor is None else floor), dtype=torch.float64)
        torch.manual_seed(1)
        out = r(x)
        clean = x @ r.w_gate.detach()
        torch.manual_seed(1)
        noisy = clean + torch.randn(clean.shape, dtype=torch.float64) * std
        torch.testing.assert_close(out.logits, noisy, rtol=0, atol=1e-12)
        val, idx = noisy.topk(2, dim=-1)
        gates = torch.zeros_like(noisy).scatter(-1, idx, torch.softmax(val, -1))  # G(x): probs of the routing
        torch.testing.assert_close(out.probs, gates, rtol=0, atol=1e-12)
        torch.testing.assert_close(out.aux_sums["load"], smooth_load(clean, noisy, std, 2).sum(0), rtol=0, atol=1e-12)


def test_weights_are_made_in_the_dtype_and_on_the_device_asked_for() -> None:
    r = NoisyTopKRouter(5, 4, dtype=torch.float64)
    assert r.w_gate.dtype == r.w_noise.dtype == torch.float64
    meta = NoisyTopKRouter(5, 4, device="meta")
    assert meta.w_gate.device.type == meta.w_noise.device.type == "meta"


def test_weights_come_back_in_the_input_dtype_while_the_router_computes_in_float32() -> None:
    r = NoisyTopKRouter(5, 4, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        r.w_gate.normal_()
    out = r(torch.randn(6, 5, dtype=torch.bfloat16))
    assert out.logits is not None and out.logits.dtype == torch.float32 and out.weights.dtype == torch.bfloat16


def _phi(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


@pytest.mark.parametrize("k", [1, 2])
def test_smooth_load_by_hand(k: int) -> None:
    """Expert i's threshold is the k-th largest of the *other* noisy logits: the (k+1)-th overall
    when i is in the top k, the k-th otherwise; P = Phi((clean - threshold) / std). Two tokens,
    float64 against math.erf."""
    clean = torch.tensor([[1.0, 0.5, -0.2], [0.0, 0.3, 0.6]], dtype=torch.float64)
    noisy = torch.tensor([[1.3, 0.2, 0.4], [0.9, -0.1, 0.5]], dtype=torch.float64)
    std = torch.tensor([[0.5, 1.0, 2.0], [1.5, 0.25, 0.75]], dtype=torch.float64)
    # sorted noisy logits: row 0 (1.3, 0.4, 0.2), row 1 (0.9, 0.5, -0.1)
    thresholds = {1: [[0.4, 1.3, 1.3], [0.5, 0.9, 0.9]], 2: [[0.2, 0.4, 0.2], [-0.1, 0.5, -0.1]]}[k]
    expected = [[_phi((float(clean[t, i]) - thresholds[t][i]) / float(std[t, i])) for i in range(3)] for t in range(2)]
    torch.testing.assert_close(
        smooth_load(clean, noisy, std, k), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12
    )
    assert smooth_load(clean.float(), noisy.float(), std.float(), k).dtype == torch.float32
