"""Auxiliary router losses against hand-worked numbers."""

from __future__ import annotations

import math

import torch

from brickwork.nn.routing import cv_squared, load_balance_loss, router_z_loss


def test_load_balance_top1_hand_worked() -> None:
    # 4 tokens, 2 experts, top-1 (argmax): tokens 0-2 -> expert 0, token 3 -> expert 1.
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]], requires_grad=True)
    chosen = torch.tensor([[0], [0], [0], [1]])
    # f = (3/4, 1/4) from the assignment; P = mean probs = (0.65, 0.35)
    # loss = E * sum f_i P_i = 2 * (0.75 * 0.65 + 0.25 * 0.35) = 2 * 0.575 = 1.15
    loss = load_balance_loss(probs, chosen, 2)
    assert math.isclose(loss.item(), 1.15, rel_tol=1e-6)
    # f carries no gradient: d loss / d p[n, i] = E * f_i / N
    loss.backward()
    expected = torch.tensor([2 * 0.75 / 4, 2 * 0.25 / 4]).expand(4, 2)
    torch.testing.assert_close(probs.grad, expected)


def test_load_balance_top2_counts_all_slots() -> None:
    # 2 tokens, 3 experts, top-2: choices {0, 1} and {0, 2}; f over tokens * k = 4 slots.
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.4, 0.1, 0.5]])
    chosen = torch.tensor([[0, 1], [0, 2]])
    # f = (2/4, 1/4, 1/4); P = (0.45, 0.2, 0.35)
    # loss = 3 * (0.5 * 0.45 + 0.25 * 0.2 + 0.25 * 0.35) = 3 * 0.3625 = 1.0875
    assert math.isclose(load_balance_loss(probs, chosen, 3).item(), 1.0875, rel_tol=1e-6)


def test_load_balance_is_one_when_uniform_and_larger_when_collapsed() -> None:
    e = 8
    uniform = torch.full((16, e), 1.0 / e)
    spread = torch.arange(16).remainder(e)[:, None]
    assert math.isclose(load_balance_loss(uniform, spread, e).item(), 1.0, rel_tol=1e-6)
    collapsed = torch.zeros(16, e)
    collapsed[:, 0] = 1.0
    # all tokens and all probability on one expert: E * 1 * 1 = E
    assert math.isclose(load_balance_loss(collapsed, torch.zeros(16, 1, dtype=torch.long), e).item(), float(e))


def test_router_z_loss_hand_worked() -> None:
    # logsumexp([0, 0]) = ln 2; logsumexp([ln 3, 0]) = ln 4; mean of squares.
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    expected = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    assert math.isclose(router_z_loss(logits).item(), expected, rel_tol=1e-6)


def test_cv_squared_of_two_experts_of_integer_loads_and_of_a_zero_mean() -> None:
    # (1, 3): population variance 1, mean 2 -> 1/4; integer counts are promoted to float32
    assert float(cv_squared(torch.tensor([1.0, 3.0], dtype=torch.float64))) == 1.0 / (4.0 + 1e-10)
    counts = cv_squared(torch.tensor([1, 2, 3, 6]))
    assert counts.dtype == torch.float32 and math.isclose(float(counts), 3.5 / 9.0, rel_tol=1e-6)
    assert cv_squared(torch.tensor([1.0, 3.0], dtype=torch.bfloat16)).dtype == torch.float32
    # mean 0: eps keeps the denominator positive, var 1e-12 / eps 1e-10 = 0.01
    zero_mean = cv_squared(torch.tensor([1e-6, -1e-6], dtype=torch.float64))
    assert math.isclose(float(zero_mean), 0.01, rel_tol=1e-9)


def test_load_balance_keeps_the_probability_dtype_and_counts_unused_experts() -> None:
    # float64 in, float64 out (f = 1/3 is not a float32 number); experts 3 and 4 chosen by nobody
    # still count in E and in f
    probs = torch.tensor(
        [[0.4, 0.3, 0.2, 0.1, 0.0], [0.1, 0.6, 0.2, 0.1, 0.0], [0.2, 0.2, 0.2, 0.2, 0.2]],
        dtype=torch.float64,
    )
    loss = load_balance_loss(probs, torch.tensor([[0], [1], [2]]), 5)
    # f = (1/3, 1/3, 1/3, 0, 0); P = (0.7, 1.1, 0.6, 0.4, 0.2) / 3: 5 * 2.4 / 9
    assert loss.dtype == torch.float64 and math.isclose(float(loss), 5 * 2.4 / 9, rel_tol=1e-14)
    # no assignment at all: f = 0, the loss 0 (not 0 / 0)
    assert float(load_balance_loss(probs, torch.zeros(0, dtype=torch.long), 5)) == 0.0


def test_router_z_loss_computes_in_float32_at_least() -> None:
    # (3, 2): the logsumexp runs over each token's experts (rows), not over the tokens
    logits = torch.tensor([[20.0, 0.0], [0.0, 0.0], [0.0, 1.0]], dtype=torch.bfloat16)
    z = router_z_loss(logits)
    assert z.dtype == torch.float32
    expected = (
        (20.0 + math.log1p(math.exp(-20.0))) ** 2 + math.log(2.0) ** 2 + (1 + math.log1p(math.exp(-1.0))) ** 2
    ) / 3
    assert math.isclose(float(z), expected, rel_tol=1e-6)  # float32 round-off
    assert router_z_loss(logits.double()).dtype == torch.float64


def test_load_balance_of_a_single_assignment() -> None:
    # one token, one choice: f = (0, 1, 0), the loss E * P_1 = 3 * 0.5
    probs = torch.tensor([[0.25, 0.5, 0.25]], dtype=torch.float64)
    assert float(load_balance_loss(probs, torch.tensor([1]), 3)) == 1.5
