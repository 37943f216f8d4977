"""Training that diverges is stopped (or its batches skipped), never recorded as a success."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from torch import Tensor, nn

from brickwork.data.base import Split
from brickwork.errors import BrickworkError
from brickwork.experiment import RunStore
from brickwork.train.loop import FitConfig, fit
from brickwork.train.recipe import TrainSettings


class PoisonedLoss:
    """Cross-entropy, except that every ``every``-th training step (from the first) gives NaN."""

    def __init__(self, every: int = 1) -> None:
        self.every, self.calls = every, 0

    def __call__(self, logits: Tensor, y: Tensor) -> Tensor:
        loss = nn.functional.cross_entropy(logits, y)
        if not torch.is_grad_enabled():  # evaluation stays finite
            return loss
        self.calls += 1
        return loss * float("nan") if (self.calls - 1) % self.every == 0 else loss


def _splits() -> tuple[Split, Split]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    y = torch.arange(32) % 4
    return Split(x, y), Split(x[:8], y[:8])


def _fit(loss_fn: object, **kw: object) -> tuple[nn.Module, list[dict]]:
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    train, val = _splits()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = FitConfig(epochs=2, batch_size=4, seed=0, schedule="constant", **kw)  # type: ignore[arg-type]
    return model, fit(model, train, val, loss_fn, opt, cfg, progress=False, desc="train m")  # type: ignore[arg-type]


def test_nan_loss_stops_with_epoch_and_step():
    with pytest.raises(BrickworkError, match=r"train m: .*nan.* epoch 1 of 2, step 1 of 8"):
        _fit(PoisonedLoss())


def test_stop_leaves_the_weights_untouched_by_the_bad_batch():
    """The check runs before the update, so the saved state is never a NaN one."""
    model = nn.Linear(4, 4)
    before = model.weight.detach().clone()
    train, val = _splits()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(BrickworkError):
        fit(model, train, val, PoisonedLoss(), opt, FitConfig(epochs=1, batch_size=4, seed=0), progress=False)  # type: ignore[arg-type]
    assert torch.equal(model.weight, before)


def test_skip_batch_trains_on_the_finite_batches():
    model, history = _fit(PoisonedLoss(every=2), nonfinite="skip_batch")
    assert len(history) == 2
    assert all(math.isfinite(row["train_loss"]) for row in history)
    assert [row["skipped_batches"] for row in history] == [4, 4]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_skip_batch_refuses_an_epoch_with_no_finite_batch():
    with pytest.raises(BrickworkError, match="every batch of epoch 1"):
        _fit(PoisonedLoss(), nonfinite="skip_batch")


def test_train_settings_carry_the_policy():
    assert TrainSettings().fit_config(seed=0).nonfinite == "stop"
    assert TrainSettings(nonfinite="skip_batch").fit_config(seed=0).nonfinite == "skip_batch"


def test_diverging_run_fails_with_one_line_and_status_failed(tmp_path, tiny_config, brickwork_cli):
    """``lr: 1e6`` used to give NaN on every epoch, a bare NaN in metrics.json and status completed."""
    tiny_config["stages"][0].update(lr=1e6, epochs=2, optimizer="sgd")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config))
    r = brickwork_cli("--runs-dir", str(tmp_path / "runs"), "run", str(cfg))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert "train mlp" in lines[0] and "epoch" in lines[0] and "step" in lines[0]
    (run,) = RunStore(tmp_path / "runs").list()
    assert run.status == "failed" and "non-finite" in (run.error or "")
    for path in (tmp_path / "runs").rglob("*.json"):
        json.loads(path.read_text(), parse_constant=_refuse)


def _refuse(token: str) -> None:
    pytest.fail(f"bare {token} in a JSON file")


def test_the_message_suggests_skip_batch_only_to_a_run_that_stops():
    hint = (
        r"; training has diverged \(lower lr, set grad_clip, or set nonfinite: skip_batch on the stage to skip"
        r" such batches\)$"
    )
    with pytest.raises(
        BrickworkError, match=r"^train m: non-finite training loss \(nan\) at epoch 1 of 2, step 1 of 8" + hint
    ):
        _fit(PoisonedLoss())
    with pytest.raises(
        BrickworkError,
        match=r"^train m: every batch of epoch 1 of 2 had a non-finite loss \(8 skipped\)"
        r"; training has diverged \(lower lr, set grad_clip\)$",
    ):
        _fit(PoisonedLoss(), nonfinite="skip_batch")


def test_a_log_window_of_only_skipped_steps_logs_the_rate_alone():
    from brickwork.train.loop import run_epoch

    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    train, _ = _splits()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = FitConfig(epochs=1, batch_size=4, seed=0, schedule="constant", nonfinite="skip_batch")
    logs: list[tuple[int, dict]] = []
    data = [(train.x[i : i + 4], train.y[i : i + 4]) for i in range(0, 32, 4)]
    loss, aux = run_epoch(
        model,
        data,
        PoisonedLoss(),
        opt,
        cfg,
        step0=0,
        total_steps=8,
        on_log=lambda s, v: logs.append((s, v)),
        log_every=4,
    )
    assert logs == [(4, {"lr": 0.1}), (8, {"lr": 0.1})]  # no loss: no step of the window was applied
    assert (loss, aux) == (0.0, {})
