"""The timing harness on fake time: rotation order, call counts, warm-up excluded, exact medians,
the contention filter's extra rounds and its cap, paired ratios, and per-sample latency."""

import pytest
import torch
from torch import nn

from brickwork.analysis.timing import Samples, interleaved, measure_latency, paired_ratio, time_rounds


class FakeMachine:
    """A clock and a foreign-load probe that only move when a candidate says so."""

    def __init__(self) -> None:
        self.now = 0.0
        self.foreign = 0.0
        self.calls: list[str] = []

    def clock(self) -> float:
        return self.now

    def probe(self) -> float:
        return self.foreign

    def candidate(self, name: str, seconds: list[float], foreign: list[float] | None = None):
        """A candidate whose i-th call takes ``seconds[i]`` and during which others use ``foreign[i]`` of the CPUs."""
        it, load = iter(seconds), iter(foreign or [0.0] * len(seconds))

        def run() -> None:
            self.calls.append(name)
            dt = next(it)
            self.now += dt
            self.foreign += next(load) * dt

        return run


def test_rounds_rotate_and_warmup_runs_in_the_rotation():
    m = FakeMachine()
    cands = {n: m.candidate(n, [1.0] * 3) for n in "abc"}
    time_rounds(cands, repeats=2, warmup=1, clock=m.clock)
    assert m.calls == list("abc" + "bca" + "cab")
    with pytest.raises(ValueError, match="no candidates"):
        time_rounds({}, clock=m.clock)


def test_each_candidate_called_warmup_plus_repeats_times_and_warmup_not_recorded():
    m = FakeMachine()
    cands = {"a": m.candidate("a", [100.0, 100.0, 3.0, 1.0, 2.0]), "b": m.candidate("b", [50.0, 50.0, 4.0, 4.0, 5.0])}
    out = time_rounds(cands, repeats=3, warmup=2, clock=m.clock)
    assert m.calls.count("a") == m.calls.count("b") == 5
    assert out["a"].seconds == [3.0, 1.0, 2.0] and out["b"].seconds == [4.0, 4.0, 5.0]
    assert out["a"].median() == 2.0 and out["b"].median() == 4.0


def test_interleaved_is_the_median_per_candidate():
    m = FakeMachine()
    cands = {"a": m.candidate("a", [9.0, 5.0, 1.0, 3.0]), "b": m.candidate("b", [9.0, 1.0, 2.0, 8.0])}
    assert interleaved(cands, repeats=3, warmup=1, clock=m.clock) == {"a": 3.0, "b": 2.0}
    m = FakeMachine()  # an even number of samples: the mean of the middle two
    cands = {"a": m.candidate("a", [9.0, 5.0, 1.0, 3.0, 2.0]), "b": m.candidate("b", [9.0, 1.0, 2.0, 8.0, 4.0])}
    assert interleaved(cands, repeats=4, warmup=1, clock=m.clock) == {"a": 2.5, "b": 3.0}


def test_contended_samples_are_discarded_and_rounds_continue_until_enough_are_clean():
    m = FakeMachine()
    # a's first timed call runs while other processes use half the machine; b is never disturbed.
    cands = {"a": m.candidate("a", [1.0, 7.0, 2.0, 4.0], [0.0, 0.5, 0.0, 0.0]), "b": m.candidate("b", [1.0] * 4)}
    out = time_rounds(cands, repeats=2, warmup=1, max_foreign=0.05, max_rounds=10, clock=m.clock, probe=m.probe)
    assert m.calls.count("a") == 4  # warm-up + 3 rounds: the contended one is replaced
    assert out["a"].foreign == [0.5, 0.0, 0.0]
    assert out["a"].clean(0.05) == [2.0, 4.0] and out["a"].median(0.05) == 3.0
    assert out["a"].median() == 4.0  # unfiltered median keeps the contended sample


def test_rounds_stop_at_max_rounds_and_median_falls_back_to_all_samples():
    m = FakeMachine()
    cands = {"a": m.candidate("a", [1.0, 3.0, 5.0, 4.0], [1.0] * 4)}
    out = time_rounds(cands, repeats=2, warmup=1, max_foreign=0.05, max_rounds=3, clock=m.clock, probe=m.probe)
    assert m.calls.count("a") == 4 and out["a"].clean(0.05) == []
    assert out["a"].median(0.05) == 4.0


def test_paired_ratio_uses_rounds_clean_for_both():
    a = Samples(seconds=[2.0, 9.0, 6.0, 3.0], foreign=[0.0, 0.0, 0.0, 0.0])
    b = Samples(seconds=[1.0, 1.0, 2.0, 1.0], foreign=[0.0, 0.9, 0.0, 0.0])
    assert paired_ratio(a, b, 0.05) == 3.0  # ratios 2, 3, 3 over rounds 0, 2, 3
    assert paired_ratio(a, b) == 3.0  # unfiltered: ratios 2, 9, 3, 3
    none = Samples(seconds=[4.0, 6.0], foreign=[1.0, 1.0])
    assert paired_ratio(none, Samples([1.0, 3.0], [1.0, 1.0]), 0.05) == 5.0 / 2.0  # ratio of medians


def test_measure_latency_is_median_seconds_per_sample_in_eval_mode():
    m = FakeMachine()
    durations = iter([10.0, 0.4, 0.8, 0.6])

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.modes: list[bool] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.modes.append(self.training)
            m.now += next(durations)
            return self.lin(x)

    model = Probe().train()
    latency = measure_latency(model, torch.randn(4, 3), repeats=3, warmup=1, clock=m.clock)
    assert latency == pytest.approx(0.6 / 4)
    assert model.modes == [False] * 4 and model.training
