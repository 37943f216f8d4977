"""The ``assemble`` and ``m2mkd`` stages through the runner, on real data (digits): results, equal
training compute, recipes that ``--resume`` and reloading replay, and clear refusals."""

import json

import pytest
import torch

from brickwork.errors import BrickworkError
from brickwork.experiment import RunStore, execute, validate

TEACHER = {"name": "mlp", "width": 16, "depth": 4}
STUDENT = {"name": "mlp", "width": 12, "depth": 2}  # dense, for speed: the MoE path is in tests/ops


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    yield 1
    torch.set_num_threads(before)


def config(stages, **top):
    return {
        "name": "asm",
        "seed": 0,
        "threads": 1,
        "data": {"name": "digits"},
        "models": {"t": TEACHER},
        "stages": stages,
        **top,
    }


ASSEMBLE = {
    "stage": "assemble",
    "modules": 2,
    "meta_epochs": 1,
    "module_epochs": 1,
    "epochs": 1,
    "lr": 0.03,
    "batch_size": 128,
}
M2MKD = {
    "stage": "m2mkd",
    "student": STUDENT,
    "modules": 2,
    "adapters": True,
    "module_epochs": 1,
    "epochs": 1,
    "lr": 0.03,
}


def test_assemble_then_m2mkd_with_baselines(runs_dir, one_thread):
    cfg = config([ASSEMBLE, M2MKD, {"stage": "evaluate", "latency_repeats": 1}])
    rec = execute(validate(cfg), RunStore(runs_dir), progress=False, echo=lambda s: None)
    m = json.loads((rec.dir / "metrics.json").read_text())["t"]
    for key in ("assemble", "assemble_e2e", "m2mkd", "m2mkd_e2e", "m2mkd_kd"):
        assert 0.1 < m[f"{key}_accuracy"] <= 1.0, key
    # equal training compute, to within half an epoch of the baseline's
    for base, method in (("assemble_e2e", "assemble"), ("m2mkd_e2e", "m2mkd"), ("m2mkd_kd", "m2mkd")):
        assert 0.5 < m[f"{base}_train_flops"] / m[f"{method}_train_flops"] < 2.0, base
    # the final model is the student (width 12), evaluated as such, and its meta model was reused
    progress = json.loads((rec.dir / "t" / "progress.json").read_text())
    assert [r["op"] for r in progress["structure"]] == ["assemble", "m2mkd"]
    assert m["test_accuracy"] == m["m2mkd_accuracy"]
    report = (rec.dir / "report.md").read_text()
    assert "the meta model of the earlier assemble stage" in report and "student plain KD" in report
    assert (rec.dir / "plots" / "m2mkd-t-train-flops.png").exists()


def test_resume_past_both_stages_gives_the_same_weights(runs_dir, one_thread, tmp_path, killed_then_resumed):
    from brickwork.experiment.artifacts import load_trained
    from brickwork.persist import load_tensors

    stages = [
        {**ASSEMBLE, "baseline": False, "batch_size": 256},
        {**M2MKD, "baselines": False, "batch_size": 256},
        {"stage": "train", "epochs": 2, "lr": 0.003, "batch_size": 256},
    ]
    cfg = config(stages)
    reference = execute(validate(cfg), RunStore(tmp_path / "ref"), progress=False, echo=lambda s: None)
    want, _ = load_tensors(reference.dir / "t" / "model")

    # digits in batches of 256: 5 steps per epoch. assemble: meta 1 + 2 modules + fine-tuning 1 = 20
    # steps; m2mkd (its meta model reused): 2 modules + 1 = 15; stop inside the last stage's 2nd epoch.
    store, resumed = killed_then_resumed(cfg, runs_dir, 20 + 15 + 7)
    got, meta = load_tensors(resumed.dir / "t" / "model")
    assert [r["op"] for r in meta["structure"]] == ["assemble", "m2mkd"]
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    trained = load_trained(store, resumed.id).model
    assert trained.stem.proj.out_features == 12 and len(trained.body) == 2  # the student, rebuilt


def test_a_student_of_another_width_without_adapters_is_refused_before_it_trains(runs_dir, one_thread):
    cfg = config([{**M2MKD, "adapters": False, "baselines": False}])
    msg = (
        r"^student module 0 \(body layers 0-0\) hands on per-sample shape \(12,\) but the meta model has \(16,\) "
        r"at position 0; set adapters: true"
    )
    with pytest.raises(BrickworkError, match=msg):
        execute(validate(cfg), RunStore(runs_dir), progress=False, echo=lambda s: None)
    with pytest.raises(
        BrickworkError, match=r"^target modules: cannot divide 4 body layers into 5 modules; expected 1 to 4$"
    ):
        execute(validate(config([{**ASSEMBLE, "modules": 5}])), RunStore(runs_dir), progress=False, echo=lambda s: None)
