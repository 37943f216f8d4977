"""evaluating(): eval mode inside, every module's own mode (children included) restored, on error too."""

import pytest
import torch
from torch import nn

from brickwork.nn.modes import evaluating


def _model() -> nn.Sequential:
    m = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.BatchNorm1d(2))
    m.train()
    m[2].eval()  # a child frozen in eval mode by the caller must stay so
    return m


def test_eval_inside_and_modes_restored() -> None:
    m = _model()
    with evaluating(m):
        assert not any(x.training for x in m.modules())
        x = torch.randn(4, 2)
        assert torch.equal(m(x), m(x))  # dropout is off
    assert m.training and m[0].training and m[1].training
    assert not m[2].training  # train(True) would have flipped it: the child's own flag came back


def test_modes_restored_when_the_block_raises() -> None:
    m, other = _model(), nn.Linear(2, 2).eval()
    with pytest.raises(RuntimeError), evaluating(m, other):
        raise RuntimeError("boom")
    assert m.training and not other.training


def test_autograd_is_left_alone() -> None:
    m = nn.Linear(2, 1)
    with evaluating(m):
        assert torch.is_grad_enabled()
        m(torch.randn(3, 2)).sum().backward()
    assert m.weight.grad is not None
