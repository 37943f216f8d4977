"""The ``sema`` stage on real data (digits): a pre-trained MLP frozen, its classes learned as a task
sequence by SEMA and its baselines; resume inside the sequence is bit-exact and the model reloads."""

import json

import pytest
import torch

from brickwork.errors import BrickworkError
from brickwork.experiment import RunStore, execute, validate


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    yield 1
    torch.set_num_threads(before)


def _cfg(threads, methods):
    return {
        "name": "sema",
        "seed": 0,
        "threads": threads,
        "data": {"name": "digits"},
        "models": {"m": {"name": "mlp", "width": 16, "depth": 2}},
        "stages": [
            {"stage": "train", "epochs": 1, "batch_size": 256, "lr": 0.02},
            {
                "stage": "sema",
                "task_data": "digits",
                "classes_per_task": 5,
                "methods": methods,
                "rank": 4,
                "descriptor_rank": 4,
                "threshold": 0.5,
                "epochs": 1,
                "batch_size": 128,
                "lr": 0.02,
            },
        ],
    }


def test_sema_and_baselines_report_accuracy_forgetting_and_adapters(runs_dir, one_thread, tb_epoch_losses):
    rec = execute(validate(_cfg(one_thread, None)), RunStore(runs_dir), progress=False, echo=lambda s: None)
    m = json.loads((rec.dir / "metrics.json").read_text())["m"]
    for method in ("sema", "fixed", "finetune"):
        assert 0.0 <= m[f"{method}_average_accuracy"] <= 1.0 and m[f"{method}_train_flops"] > 0
    assert m["finetune_adapters"] == 0 and m["fixed_adapters"] == 2
    assert 2 <= m["sema_adapters"] <= 4  # one per layer on the first task, at most one more per layer
    report = (rec.dir / "report.md").read_text()
    assert "SEMA's expansion checks" in report and "| finetune |" in report
    if tb_epoch_losses:  # None without the tensorboard extra
        # TensorBoard: a folder per method, task and phase (two tasks; each phase one epoch).
        curves = tb_epoch_losses(rec.dir, "m")
        assert curves.pop("stage0-train") and all(len(v) == 1 for v in curves.values())
        for method in ("sema", "fixed", "finetune"):
            tasks = {k.split("/")[1] for k in curves if k.startswith(f"stage1-{method}/")}
            assert tasks == {"task0", "task1"}, method


def test_resume_inside_the_task_sequence_is_bit_exact(runs_dir, one_thread, tmp_path, killed_then_resumed):
    from brickwork.experiment.artifacts import load_trained
    from brickwork.persist import load_tensors

    cfg = _cfg(one_thread, ["sema"])
    ref = execute(validate(cfg), RunStore(tmp_path / "ref"), progress=False, echo=lambda s: None)
    want, meta = load_tensors(ref.dir / "m" / "model")
    assert meta["structure"][0]["op"] == "sema" and meta["structure"][0]["classes"] == [5, 5]

    # 5 pre-training steps, 5 on the first task: stop inside the second
    store, resumed = killed_then_resumed(cfg, runs_dir, 5 + 6)
    got, _ = load_tensors(resumed.dir / "m" / "model")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    model = load_trained(store, resumed.id).model
    assert type(model.body.layers[0]).__name__ == "SEMALayer"


def test_a_sequence_that_does_not_divide_is_refused(runs_dir, one_thread):
    cfg = _cfg(one_thread, ["sema"])
    cfg["stages"][1]["classes_per_task"] = 3
    with pytest.raises(BrickworkError, match="does not split into tasks of 3 classes"):
        execute(validate(cfg), RunStore(runs_dir), progress=False, echo=lambda s: None)
