"""The distill stage end to end on digits: teachers from a variant, a run, a checkpoint and an earlier stage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from brickwork.cli import main
from brickwork.data import load_dataset
from brickwork.data.base import Split
from brickwork.experiment import RunStore, execute, validate
from brickwork.experiment.artifacts import load_trained
from brickwork.experiment.build import build_model, model_spec
from brickwork.train.distill import Distiller, Term, frozen_teacher
from brickwork.train.recipe import TrainSettings, train_with

TEACHER = {"name": "cnn", "channels": [4, 8]}
STUDENT = {"name": "mlp", "width": 16, "depth": 1}
KD = {"loss": "logit_kd", "args": {"temperature": 2.0, "alpha": 0.5, "beta": 0.5}}
HINT = {"loss": "hint", "student": "head.proj", "student_io": "input", "teacher": "head.proj", "teacher_io": "input"}


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _config(models: dict[str, Any], stages: list[dict[str, Any]], name: str = "distill") -> dict[str, Any]:
    return {"name": name, "seed": 0, "threads": 1, "data": {"name": "digits"}, "models": models, "stages": stages}


def _run(runs_dir: Path, cfg: dict[str, Any]) -> Any:
    rec = execute(validate(cfg), RunStore(runs_dir), progress=False, echo=lambda s: None)
    assert rec.status == "completed"
    return rec


def _weights(runs_dir: Path, run_id: str, label: str) -> dict[str, torch.Tensor]:
    return load_trained(RunStore(runs_dir), run_id, label).model.state_dict()


def test_teacher_variant_students_and_label_baseline(runs_dir: Path, tb_epoch_losses: Any) -> None:
    stage = {
        "stage": "distill",
        "teacher": {"variant": "t"},
        "epochs": 1,
        "cache": "file",
        "losses": {"kd": KD, "labels": {"loss": "labels"}, "hint": {**HINT, "adapter": True}},
        "students": {"kd": ["kd"], "hint": ["labels", "hint"]},
    }
    models = {"t": TEACHER, "base": STUDENT, "kd": STUDENT, "hint": STUDENT}
    rec = _run(runs_dir, _config(models, [stage]))
    assert len(list((rec.dir / "teacher-cache").glob("*.safetensors"))) == 2  # kd's and hint's taps
    if tb_epoch_losses:  # None without the tensorboard extra
        # TensorBoard: the label-only variants train on labels, the students distil; one epoch each.
        assert tb_epoch_losses(rec.dir, "base").keys() == {"stage0-labels"}
        assert {k: len(v) for k, v in tb_epoch_losses(rec.dir, "kd").items()} == {"stage0-distill": 1}
    data = load_dataset("digits", seed=0)
    settings = TrainSettings(epochs=1)

    def trained(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)  # as the stage does
        train_with(
            model, Split(data.train.x, torch.arange(len(data.train))), data.val, settings, seed=0, progress=False
        )
        return model.state_dict()

    # the label-only baseline is the train stage's recipe; the cached student equals a live-teacher one
    torch.manual_seed(0)
    base = build_model(model_spec(STUDENT), data.in_shape, data.num_classes)
    torch.manual_seed(0)
    train_with(base, data.train, data.val, settings, seed=0, progress=False)
    got = _weights(runs_dir, rec.id, "base")
    assert all(torch.equal(got[k], v) for k, v in base.state_dict().items())
    teacher = frozen_teacher(load_trained(RunStore(runs_dir), rec.id, "t").model)
    torch.manual_seed(0)
    student = build_model(model_spec(STUDENT), data.in_shape, data.num_classes)
    live = Distiller(student, teacher, {"kd": Term(**KD)}, data.train.y, data.train.x[:8])
    trained(live)
    got = _weights(runs_dir, rec.id, "kd")
    assert all(torch.equal(got[k], v) for k, v in student.state_dict().items())
    assert not torch.equal(got["head.proj.weight"], base.state_dict()["head.proj.weight"])
    metrics = json.loads((rec.dir / "metrics.json").read_text())
    assert "teacher_val_accuracy" in metrics["kd"] and "teacher_val_accuracy" not in metrics["base"]
    report = (rec.dir / "report.md").read_text()
    assert "Distilled from variant t" in report and "| hint | hint | 1 |" in report


def test_teachers_from_a_run_a_checkpoint_and_an_earlier_stage(runs_dir: Path) -> None:
    """One pipeline of four stages: train, distil from a run of the store, from a checkpoint
    file, then from this variant's own model (born-again, into a re-initialised copy)."""
    first = _run(runs_dir, _config({"t": TEACHER}, [{"stage": "train", "epochs": 1}], name="teacher"))
    kd = {"epochs": 1, "losses": {"kd": KD}}
    stages = [
        {"stage": "train", "epochs": 1},
        {"stage": "distill", "teacher": {"run": first.id, "model": "t"}, **kd},
        {"stage": "distill", "teacher": {"checkpoint": str(first.dir / "t" / "model.safetensors")}, **kd},
        {"stage": "distill", "teacher": {"current": True}, "cache": "none", **kd},
    ]
    rec = _run(runs_dir, _config({"s": STUDENT}, stages))
    report = (rec.dir / "report.md").read_text()
    for source in (f"run {first.id} model t", f"checkpoint {first.dir / 't' / 'model.safetensors'}", "this variant"):
        assert f"Distilled from {source}" in report


def test_bad_tap_path_and_missing_adapter_fail_with_one_line(runs_dir: Path, tmp_path: Path, capsys: Any) -> None:
    import yaml

    cfg = _config(
        {"t": TEACHER, "s": STUDENT},
        [
            {
                "stage": "distill",
                "teacher": {"variant": "t"},
                "epochs": 1,
                "losses": {"h": {**HINT, "student": "head.prj"}},
            }
        ],
    )
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert main(["--runs-dir", str(runs_dir), "run", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "losses.h.student: " in err[0] and "'head.prj'" in err[0] and "head.proj" in err[0]
    cfg["stages"][0]["losses"] = {"h": HINT}  # student (16,) vs teacher (8,), no adapter
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert main(["--runs-dir", str(runs_dir), "run", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "(8, 16)" in err[0] and "(8, 8)" in err[0] and "adapter: true" in err[0]
