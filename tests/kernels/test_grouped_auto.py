"""``grouped_linear(backend="auto")``: the choice is measured on the call's own operands, once per
shape class, among the backends that can run them; the timing leaves the caller's graph alone;
the process keeps every choice for reports (a fake timer gives the seconds; the calls are real)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from brickwork.kernels import autotune
from brickwork.kernels.autotune import Autotuner, backends_used, choices_made
from brickwork.kernels.grouped import grouped_backends, grouped_linear

SECONDS = {"grouped_mm": 3.0, "split": 2.0, "bmm": 1.0}  # bmm "fastest"
HAS_GMM = hasattr(torch, "_grouped_mm")


class RunningTimer:
    """Runs each candidate's call (so it must work) and reports the seconds of a table."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.grads: list[bool] = []

    def __call__(self, name: str, fn: Callable[[], object]) -> float:
        fn()
        self.names.append(name)
        self.grads.append(torch.is_grad_enabled())
        return SECONDS[name]


@pytest.fixture
def tuner(monkeypatch: pytest.MonkeyPatch, tmp_path) -> Autotuner:
    monkeypatch.delenv("BRICKWORK_BACKEND", raising=False)
    t = Autotuner(tmp_path / "autotune.json", timer=RunningTimer(), machine="CPU A | torch 1", min_flops=0)
    monkeypatch.setattr(autotune, "TUNER", t)
    return t


def _operands(dtype: torch.dtype = torch.float32, rows: int = 10):
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([3, 0, rows - 5, 2])
    x = torch.randn(rows, 8, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(4, 8, 16, generator=g, dtype=dtype, requires_grad=True)
    return x, w, counts


def _reference(x, w, counts):
    starts = [0, *torch.cumsum(counts, 0).tolist()]
    return torch.cat([x[starts[i] : starts[i + 1]] @ w[i] for i in range(len(counts))])


def test_auto_measures_the_applicable_backends_once_per_class_on_the_calls_operands(tuner: Autotuner) -> None:
    leaf, w, counts = _operands()
    x = leaf * 1.0  # an upstream layer's output, as in a model: not a leaf
    timer = tuner.timer
    assert isinstance(timer, RunningTimer)
    y = grouped_linear(x, w, counts)
    applicable = ["grouped_mm", "split", "bmm"] if HAS_GMM else ["split", "bmm"]
    assert grouped_backends(x, w) == applicable
    assert set(timer.names) == set(applicable) and all(timer.grads)  # timed with their backward
    (key,) = tuner.made
    assert key == "moe 16x8x16x4 float32 fwd+bwd cpu"  # rows bucketed to 16; K, M, groups exact
    assert tuner.made[key].backend == "bmm" and tuner.made[key].source == "measured"
    assert leaf.grad is None and w.grad is None  # the timing calls' backward reached no caller tensor
    torch.testing.assert_close(y, _reference(x, w, counts), rtol=0, atol=1e-5)
    y.backward(torch.ones_like(y))  # the caller's own graph is intact (not freed by a timing backward)
    rows_w = w.detach()[[0, 0, 0, 2, 2, 2, 2, 2, 3, 3]]  # each row's matrix
    torch.testing.assert_close(leaf.grad, rows_w.sum(2), rtol=0, atol=1e-5)  # d sum(y) / dx = W_g @ 1
    n = len(timer.names)
    x2, w2, counts2 = _operands(rows=13)  # 13 rows: the same bucket, no new timing
    grouped_linear(x2, w2, counts2)
    assert len(timer.names) == n and tuner.timings == 1


def test_auto_without_autograd_is_another_class_timed_forward_only(tuner: Autotuner) -> None:
    x, w, counts = _operands()
    with torch.no_grad():
        y = grouped_linear(x, w, counts)
    assert list(tuner.made) == ["moe 16x8x16x4 float32 fwd cpu"] and tuner.timings == 1
    torch.testing.assert_close(y, _reference(x, w, counts).detach(), rtol=0, atol=1e-5)


def test_auto_in_float64_never_offers_grouped_mm(tuner: Autotuner) -> None:
    x, w, counts = _operands(torch.float64)
    y = grouped_linear(x, w, counts)
    assert grouped_backends(x, w) == ["split", "bmm"]
    assert set(tuner.timer.names) == {"split", "bmm"}  # type: ignore[attr-defined]
    torch.testing.assert_close(y, _reference(x, w, counts), rtol=0, atol=1e-12)


def test_auto_passes_the_forward_flops_so_small_calls_are_not_timed(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    # 2 * A * K * M = 2 * 10 * 8 * 16 = 2560 forward FLOPs: timed at min_flops 2560, not at 2561.
    monkeypatch.delenv("BRICKWORK_BACKEND", raising=False)
    x, w, counts = _operands()
    for min_flops, timed in [(2561, False), (2560, True)]:
        t = Autotuner(
            tmp_path / f"{min_flops}.json", timer=RunningTimer(), machine="CPU A | torch 1", min_flops=min_flops
        )
        monkeypatch.setattr(autotune, "TUNER", t)
        grouped_linear(x, w, counts)
        (choice,) = t.made.values()
        assert (t.timings, choice.source) == ((1, "measured") if timed else (0, "small"))


def test_the_choices_made_are_kept_for_reports(tuner: Autotuner) -> None:
    x, w, counts = _operands()
    grouped_linear(x, w, counts)  # fwd+bwd: bmm
    with torch.no_grad():
        grouped_linear(x.double(), w.double(), counts)  # fwd, float64: bmm again
    made = choices_made()
    assert sorted(made) == ["moe 16x8x16x4 float32 fwd+bwd cpu", "moe 16x8x16x4 float64 fwd cpu"]
    made.clear()  # a copy: the tuner keeps its own
    assert len(tuner.made) == 2
    assert backends_used("moe") == "bmm" and backends_used("moe", "fwd") == "bmm"
    assert backends_used("sparse") == "-" and backends_used("moe", "bwd") == "-"
    tuner.made["moe 16x8x16x4 float64 fwd cpu"].backend = "split"
    assert backends_used("moe") == "bmm+split" and backends_used("moe", "fwd") == "split"
    assert backends_used("moe", "fwd+bwd") == "bmm"
