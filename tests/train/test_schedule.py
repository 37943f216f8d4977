"""The learning-rate schedule, directly at its end points and as ``fit`` applies it across epochs
and across a resume (one global step count over the whole run, never restarted per epoch)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from brickwork.data.base import Split
from brickwork.train.loop import FitConfig, fit
from brickwork.train.optim import lr_factor


def test_warmup_is_linear_from_one_step_to_the_base_rate() -> None:
    assert [lr_factor("constant", s, 10, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine_starts_at_one_halves_at_midpoint_and_reaches_zero() -> None:
    total, warmup = 12, 2
    assert lr_factor("cosine", warmup, total, warmup) == 1.0  # first step after warm-up
    assert lr_factor("cosine", warmup + 5, total, warmup) == pytest.approx(0.5, abs=1e-15)  # half of the 10 decay steps
    assert lr_factor("cosine", total, total, warmup) == pytest.approx(0.0, abs=1e-15)
    assert lr_factor("cosine", total + 3, total, warmup) == pytest.approx(0.0, abs=1e-15)  # clamped, no restart
    # the last step actually taken (total - 1) is one decay step before zero
    assert lr_factor("cosine", total - 1, total, warmup) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.9)))
    assert lr_factor("constant", total - 1, total, 0) == 1.0


class _Recording(torch.optim.SGD):
    """SGD that records the learning rate each step ran with; ``crash_at`` simulates a kill."""

    def __init__(self, params: Any, lr: float, crash_at: int | None = None) -> None:
        super().__init__(params, lr=lr)
        self.lrs: list[float] = []
        self.crash_at = crash_at

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        if self.crash_at is not None and len(self.lrs) == self.crash_at:
            raise KeyboardInterrupt
        self.lrs.append(self.param_groups[0]["lr"])
        return super().step(closure)


def _problem() -> tuple[nn.Module, Split, Split]:
    torch.manual_seed(0)
    x = torch.randn(40, 3)
    y = (x[:, 0] > 0).long()
    return nn.Linear(3, 2), Split(x, y), Split(x[:8], y[:8])


CFG = FitConfig(epochs=3, batch_size=10, seed=0, schedule="cosine", warmup_steps=2)  # 4 steps per epoch
BASE = 0.1
EXPECTED = [BASE * lr_factor("cosine", s, 12, 2) for s in range(12)]


def test_fit_runs_one_schedule_over_all_epochs() -> None:
    model, train, val = _problem()
    opt = _Recording(model.parameters(), BASE)
    fit(model, train, val, nn.functional.cross_entropy, opt, CFG, progress=False)
    assert opt.lrs == EXPECTED
    assert opt.lrs[4] < opt.lrs[3]  # epoch 2 continues the decay instead of starting over


def test_resumed_fit_continues_the_schedule_where_it_stopped(tmp_path: Path) -> None:
    state = tmp_path / "state"
    model, train, val = _problem()
    with pytest.raises(KeyboardInterrupt):  # killed at step 6, inside epoch 2 (epoch 1 saved)
        crashing = _Recording(model.parameters(), BASE, crash_at=6)
        fit(model, train, val, nn.functional.cross_entropy, crashing, CFG, state_path=state, progress=False)
    model, train, val = _problem()
    opt = _Recording(model.parameters(), BASE)
    fit(model, train, val, nn.functional.cross_entropy, opt, CFG, state_path=state, progress=False)
    assert opt.lrs == EXPECTED[4:]  # resumes at epoch 2's first step, not at the warm-up
