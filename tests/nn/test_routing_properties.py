"""Routing properties that hold only in the general case: k > 1 and capacities that are not whole.

The cases the older tests use (top-1 with renormalisation, N * c / E a whole number) make the
property trivially true: every top-1 renormalised weight is 1.0, and floor equals ceil.
"""

from __future__ import annotations

import math

import pytest
import torch

from brickwork.nn.routing.balance import SelectionBias
from brickwork.nn.routing.expert_choice import ExpertChoiceRouter
from brickwork.nn.routing.topk import TopKRouter

D, E = 6, 5


@pytest.mark.parametrize("gate", ["softmax_topk", "softmax_topk_renorm", "sigmoid_topk_renorm"])
def test_aux_free_bias_moves_the_choice_but_not_the_weights(gate: str) -> None:
    """DeepSeek-V3's auxiliary-loss-free balancing: the bias enters the choice of the k experts
    only; the combine weights are the unbiased scores of the chosen experts (renormalised over
    them where the gate renormalises)."""
    torch.manual_seed(0)
    r = TopKRouter(D, E, top_k=2, gate=gate, balance_rate=0.01, load_balance=False, z_loss=False).eval()  # type: ignore[arg-type]
    assert r.selection_bias is not None
    # a bias large enough to change the choice, and unequal, so a weight taken from the biased
    # scores differs from the unbiased one even after renormalisation
    r.selection_bias.bias.copy_(torch.tensor([0.0, 0.3, -0.2, 0.5, 0.1]))
    x = torch.randn(64, D)
    out = r(x)

    logits = r.proj(x).float()
    scores = torch.sigmoid(logits) if gate.startswith("sigmoid") else torch.softmax(logits, -1)
    chosen = torch.topk(scores + r.selection_bias.bias, 2, dim=-1).indices
    assert not torch.equal(chosen.sort(-1).values, torch.topk(scores, 2, -1).indices.sort(-1).values)
    expected = scores.gather(-1, chosen)
    if gate.endswith("renorm"):
        expected = expected / expected.sum(-1, keepdim=True)
    assert torch.equal(out.expert_idx.view(-1, 2), chosen)
    # the router computes in float32 by design; the same operations in the same order agree to
    # float32 round-off, while weights taken from the biased scores differ by about 0.1
    torch.testing.assert_close(out.weights.view(-1, 2), expected, rtol=1.3e-6, atol=1e-7)


@pytest.mark.parametrize(("n", "c", "expected"), [(10, 1.0, 3), (7, 2.0, 4), (11, 0.5, 2), (3, 1.0, 1), (9, 8.0, 9)])
def test_expert_choice_capacity_rounds_up(n: int, c: float, expected: int) -> None:
    """C = ceil(N c / E), at least 1, at most N (Zhou et al., 2022): with N c / E = 2.5 every
    expert takes 3 tokens, not 2; the forward gives each expert exactly C distinct tokens."""
    r = ExpertChoiceRouter(D, E - 1, capacity_factor=c)
    assert r.capacity(n) == expected == max(1, min(n, math.ceil(n * c / (E - 1))))
    out = r(torch.randn(n, D))
    load = torch.bincount(out.expert_idx, minlength=E - 1)
    assert torch.equal(load, torch.full((E - 1,), expected))
    assert all(len(set(row.tolist())) == expected for row in out.token_idx.view(E - 1, expected))


def test_selection_bias_accumulates_the_load_of_every_forward_until_the_update() -> None:
    """Gradient accumulation: the load of all micro-batches since the last step decides the sign;
    the update moves each bias by exactly the rate, resets the load, and without load does nothing."""
    sb = SelectionBias(4, rate=0.25)
    assert sb.extra_repr() == "num_experts=4, rate=0.25"
    assert torch.equal(sb.update(), torch.zeros(4)) and torch.equal(sb.bias, torch.zeros(4))  # no load yet
    sb.observe(torch.tensor([[0, 1], [0, 2]]))  # (N, k) choices of one micro-batch
    sb.observe(torch.tensor([0, 0, 3]))  # and of another: loads (4, 1, 1, 1), mean 1.75
    assert torch.equal(sb.pending_load, torch.tensor([4.0, 1.0, 1.0, 1.0], dtype=torch.float64))
    direction = sb.update()
    assert torch.equal(direction, torch.tensor([-1.0, 1.0, 1.0, 1.0]))
    assert torch.equal(sb.bias, torch.tensor([-0.25, 0.25, 0.25, 0.25])) and not sb.pending_load.any()
    sb.observe(torch.tensor([1, 2]))  # loads (0, 1, 1, 0), mean 0.5
    sb.update()
    assert torch.equal(sb.bias, torch.tensor([0.0, 0.0, 0.0, 0.5]))
    scores = torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    biased = sb.biased(scores)
    assert biased.dtype == torch.float64 and torch.equal(biased, scores + torch.tensor([0.0, 0.0, 0.0, 0.5]))
    for rate in (0.0, -1e-3):
        with pytest.raises(ValueError, match=rf"^SelectionBias: rate must be > 0, got {rate}$"):
            SelectionBias(4, rate=rate)
    meta = SelectionBias(4, rate=0.1, device="meta")
    assert meta.bias.device.type == meta.pending_load.device.type == "meta"
    assert meta.bias.dtype == torch.float32 and meta.pending_load.dtype == torch.float64


def test_aux_free_bias_of_topk_softmax_is_added_to_the_logits() -> None:
    """``topk_softmax`` scores are the logits: the selection bias shifts the logits for the choice,
    and the weights stay the softmax over the chosen k unbiased logits. Biasing the probabilities
    instead would choose other experts."""
    torch.manual_seed(0)
    r = TopKRouter(D, E, top_k=2, gate="topk_softmax", balance_rate=0.01, load_balance=False, z_loss=False).eval()
    assert r.selection_bias is not None
    bias = torch.tensor([0.0, 0.3, -0.2, 0.5, 0.1])
    r.selection_bias.bias.copy_(bias)
    x = torch.randn(64, D)
    out = r(x)
    logits = r.proj(x).float()
    chosen = torch.topk(logits + bias, 2, dim=-1).indices
    assert not torch.equal(chosen, torch.topk(torch.softmax(logits, -1) + bias, 2, dim=-1).indices)
    assert torch.equal(out.expert_idx.view(-1, 2), chosen)
    expected = torch.softmax(logits.gather(-1, chosen), -1)
    torch.testing.assert_close(out.weights.view(-1, 2), expected, rtol=1.3e-6, atol=1e-7)  # float32 router math
