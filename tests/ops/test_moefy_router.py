"""MoEfication's MLP router training, directly: recall by hand, and a router that learns a
learnable target (the fit must beat its initialisation, and the weights kept are those reported)."""

from __future__ import annotations

import pytest
import torch

from brickwork.nn.routing.key_routers import MLPRouter
from brickwork.ops.moefy_router import router_recall, train_mlp_router


def test_recall_by_hand() -> None:
    scores = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0], [1.0, 0.0, 0.0, 2.0]])
    target = torch.tensor([[9.0, 1.0, 8.0, 0.0], [0.0, 7.0, 1.0, 9.0], [0.0, 5.0, 6.0, 1.0]])
    # top-2 found: {0,1} vs {0,2} -> 1 of 2; {3,2} vs {3,1} -> 1 of 2; {3,0} vs {2,1} -> 0 of 2
    assert router_recall(scores, target, 2) == pytest.approx(2 / 6, abs=1e-7)  # a float32 mean
    assert router_recall(scores, target, 1) == pytest.approx(2 / 3, abs=1e-7)  # top-1: 0 = 0, 3 = 3, 3 != 2


def test_training_learns_a_learnable_target() -> None:
    """Expert activation sums that are a fixed function of the direction of x: a trained router
    finds nearly all top-2 experts, far above its random initialisation (2/8 by chance)."""
    torch.manual_seed(0)
    d, e, n = 16, 8, 2000
    teacher = torch.randn(e, d)
    x = torch.randn(n, d)
    target = torch.relu(torch.nn.functional.normalize(x, dim=-1) @ teacher.t()) * 4  # (N, E) >= 0
    router = MLPRouter(d, e, top_k=2)
    before = {k: v.clone() for k, v in router.state_dict().items()}
    stats = train_mlp_router(router, x, target, epochs=8, batch_size=128, lr=3e-2)
    assert stats["recall_keys"] < 0.5 < 0.85 < stats["recall"]
    assert stats["epoch"] >= 1 and any(not torch.equal(before[k], v) for k, v in router.state_dict().items())
    # the kept weights are those of the reported recall (the state was restored, not the last epoch's)
    held = torch.randperm(n, generator=torch.Generator().manual_seed(0))[: n // 10]
    with torch.no_grad():
        assert router_recall(router.scores(x[held]), target[held], 2) == stats["recall"]
