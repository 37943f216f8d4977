"""The runner's step (issue 16): the same numbers as the plain loop, without per-step host reads."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from brickwork.nn.hooks import after_optimizer_step, reset_regrown_state
from brickwork.nn.records import aux_weight, collect_aux_losses
from brickwork.train.loop import FitConfig, run_epoch

WEIGHTS = {"load_balance": 0.5}  # z_loss gets its paper weight


class Lazy(nn.Module):
    """A brick that creates ``aux_losses`` in its first forward and counts its hook calls."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.after = 0
        self.progress: list[float] = []

    def forward(self, x: Tensor) -> Tensor:
        h = self.lin(x)
        self.aux_losses = {"load_balance": h.pow(2).mean(), "z_loss": h.abs().mean()}
        return torch.tanh(h)

    def after_step(self) -> None:
        self.after += 1

    def set_progress(self, fraction: float) -> None:
        self.progress.append(fraction)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), Lazy(), nn.Sequential(Lazy(), nn.Linear(6, 3))).double()


def _batches() -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)) for _ in range(7)
    ]


def _reference(model: nn.Module, opt: torch.optim.Optimizer, data, total: int) -> tuple[float, dict[str, float]]:
    """The loop as it was written before the plan: a walk of the model and a read per value per step."""
    loss_sum, aux_sum = 0.0, {}
    for i, (x, y) in enumerate(data):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        aux = collect_aux_losses(model)
        (loss + sum(aux_weight(k, WEIGHTS) * v for k, v in aux.items())).backward()
        opt.step()
        after_optimizer_step(model, (i + 1) / total)
        reset_regrown_state(model, opt)
        loss_sum += loss.item()
        for k, v in aux.items():
            aux_sum[k] = aux_sum.get(k, 0.0) + v.item()
    return loss_sum / len(data), {k: v / len(data) for k, v in aux_sum.items()}


def test_run_epoch_equals_the_plain_loop_exactly_with_lazy_aux_losses_and_hooks():
    data = _batches()
    model = _model()
    ref_model = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=0.05)
    cfg = FitConfig(epochs=1, batch_size=8, seed=0, schedule="constant", aux_weights=WEIGHTS)
    got = run_epoch(model, data, nn.functional.cross_entropy, opt, cfg, step0=0, total_steps=len(data))
    want = _reference(ref_model, ref_opt, data, len(data))
    assert got == want  # exact: the device sums are the float sums
    assert list(got[1]) == ["load_balance", "z_loss"]
    for a, b in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(a, b)
    lazy = [m for m in model.modules() if isinstance(m, Lazy)]
    assert [m.after for m in lazy] == [len(data)] * 2
    assert lazy[0].progress == [(i + 1) / len(data) for i in range(len(data))]


def test_a_step_reads_the_host_once_and_the_epoch_once_more(monkeypatch):
    """One ``.item()`` per step (the non-finite check before the update), one transfer per epoch."""
    reads = {"item": 0, "tolist": 0, "float": 0}
    for name in reads:
        attr = "__float__" if name == "float" else name
        real = getattr(Tensor, attr)

        def counted(self, *a, _real=real, _name=name):
            reads[_name] += 1
            return _real(self, *a)

        monkeypatch.setattr(Tensor, attr, counted)
    data = _batches()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = FitConfig(epochs=1, batch_size=8, seed=0, aux_weights=WEIGHTS)
    run_epoch(model, data, nn.functional.cross_entropy, opt, cfg, step0=0, total_steps=len(data))
    assert reads == {"item": len(data), "tolist": 1, "float": 0}


@pytest.mark.parametrize("every", [3, 7])
def test_on_log_gets_window_means_that_add_up_to_the_epoch_mean(every):
    data = _batches()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = FitConfig(epochs=1, batch_size=8, seed=0, aux_weights=WEIGHTS)
    logged: list[tuple[int, dict[str, float]]] = []
    mean, aux = run_epoch(
        model, data, nn.functional.cross_entropy, opt, cfg, step0=14, total_steps=21,
        on_log=lambda s, v: logged.append((s, v)), log_every=every,
    )  # fmt: skip
    steps = [s for s, _ in logged]
    assert steps == [s for s in range(15, 22) if s % every == 0 or s == 21]
    sizes = [b - a for a, b in zip([14, *steps], steps, strict=False)]
    assert sum(n * v["loss"] for n, (_, v) in zip(sizes, logged, strict=True)) == pytest.approx(mean * 7, rel=1e-12)
    assert sum(n * v["aux.z_loss"] for n, (_, v) in zip(sizes, logged, strict=True)) == pytest.approx(
        aux["z_loss"] * 7, rel=1e-12
    )
