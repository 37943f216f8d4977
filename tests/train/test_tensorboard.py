"""TensorBoard logging: the event files a run writes hold the scalars the run recorded, once each."""

from __future__ import annotations

import json

import pytest

from brickwork.experiment import RunStore, execute, validate
from brickwork.train import tensorboard
from brickwork.train.optim import lr_factor

STEPS = 20  # digits: 1257 training images, batch 64 -> 20 steps per epoch
EPOCHS = 2


def _run(cfg, runs_dir):
    return execute(validate(cfg), RunStore(runs_dir), progress=False, echo=lambda s: None)


@pytest.fixture
def moe_config(tiny_config):
    tiny_config["models"] = {
        "moe": {"name": "moe_mlp", "width": 16, "depth": 1, "hidden": 16, "num_experts": 4, "top_k": 1},
    }
    tiny_config["aux_weights"] = {"load_balance": 0.01}
    return tiny_config


def test_event_files_hold_the_recorded_curves_once_even_after_a_kill_and_resume(
    moe_config, tmp_path, killed_then_resumed, tb_scalars
):
    pytest.importorskip("tensorboard", reason="needs the tensorboard extra")
    moe_config["stages"][0]["epochs"] = EPOCHS
    ref = _run(moe_config, tmp_path / "ref")
    state = (ref.dir / "moe" / "progress.json").read_text()
    train = tb_scalars(ref.dir / "tb" / "moe" / "seed0" / "stage0-train")
    history = json.loads(state)["history"]
    assert len(history) == EPOCHS
    log_steps = sorted({*range(10, EPOCHS * STEPS + 1, 10), *(STEPS * e for e in range(1, EPOCHS + 1))})
    for tag in ("train/loss", "train/lr", "train/aux.load_balance", "train/aux.z_loss"):
        assert [s for s, _ in train[tag]] == log_steps, tag
    ends = [STEPS * e for e in range(1, EPOCHS + 1)]
    for tag, key in (("train/epoch_loss", "train_loss"), ("val/loss", "val_loss"), ("val/accuracy", "val_accuracy")):
        assert [s for s, _ in train[tag]] == ends, tag
        assert [v for _, v in train[tag]] == pytest.approx([row[key] for row in history], rel=1e-6), tag
    # The window means of the logged steps average back to each epoch's mean loss.
    for e, row in enumerate(history):
        window = [v for s, v in train["train/loss"] if e * STEPS < s <= (e + 1) * STEPS]
        assert window[0] * 10 + window[1] * 10 == pytest.approx(row["train_loss"] * STEPS, rel=1e-5)
    # The learning rate step s was taken with: peak 0.01 times the cosine schedule at step s - 1.
    want_lr = [0.01 * lr_factor("cosine", s - 1, EPOCHS * STEPS, 0) for s in log_steps]
    assert [v for _, v in train["train/lr"]] == pytest.approx(want_lr, rel=1e-6)
    for stat in ("imbalance", "dropped_fraction", "entropy"):
        (tag,) = [t for t in train if t.startswith("routing/") and t.endswith(stat)]
        assert [s for s, _ in train[tag]] == ends
    assert all(v >= 1.0 for _, v in train[next(t for t in train if t.endswith("imbalance"))])
    evaluated = tb_scalars(ref.dir / "tb" / "moe" / "seed0" / "stage1-evaluate")
    metrics = ref.metrics["moe"]
    assert evaluated["test/accuracy"] == [(0, pytest.approx(metrics["test_accuracy"], rel=1e-6))]
    assert evaluated["test/flops_per_sample"] == [(0, pytest.approx(metrics["flops_per_sample"], rel=1e-6))]

    # Killed in epoch 2 after 35 steps (step 30 logged): the resumed run redoes 21-40, each logged once.
    _, resumed = killed_then_resumed(moe_config, tmp_path / "killed", 35)
    again = tb_scalars(resumed.dir / "tb" / "moe" / "seed0" / "stage0-train")
    assert again.keys() == train.keys()
    for tag, points in train.items():
        assert [s for s, _ in again[tag]] == [s for s, _ in points], tag
        assert [v for _, v in again[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag


def test_log_tensorboard_false_writes_no_event_files(tiny_config, runs_dir):
    tiny_config["log"] = {"tensorboard": False}
    tiny_config["stages"] = [{**tiny_config["stages"][0], "epochs": 1}]
    rec = _run(tiny_config, runs_dir)
    assert not (rec.dir / "tb").exists()
    assert validate(tiny_config).to_dict()["log"] == {"tensorboard": False}


def test_without_the_extra_a_run_works_and_says_once_that_curves_need_it(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr(tensorboard, "available", lambda: False)
    monkeypatch.setattr(tensorboard, "_SAID", [])
    said: list[str] = []
    tiny_config["stages"] = [{**tiny_config["stages"][0], "epochs": 1}]
    for i in range(2):
        rec = execute(validate(tiny_config), RunStore(tmp_path / f"r{i}"), progress=False, echo=said.append)
        assert rec.status == "completed" and not (rec.dir / "tb").exists()
    assert said.count(tensorboard.NEEDS_EXTRA) == 1


def test_write_scalars_writes_one_evaluation_at_its_step(tmp_path, tb_scalars):
    pytest.importorskip("tensorboard", reason="needs the tensorboard extra")
    tensorboard.write_scalars(tmp_path / "eval", {"accuracy": 0.5, "loss": float("nan")}, "test", step=7)
    assert tb_scalars(tmp_path / "eval") == {"test/accuracy": [(7, 0.5)]}  # non-finite values are skipped
    tensorboard.write_scalars(tmp_path / "eval", {"accuracy": 0.75}, "test", step=7)  # a later attempt
    assert tb_scalars(tmp_path / "eval") == {"test/accuracy": [(7, 0.75)]}  # replaces the earlier one
    tensorboard.write_scalars(None, {"accuracy": 0.5}, "test")  # no folder: nothing to write, no error
