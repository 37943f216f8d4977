"""The ``transfer`` stage end to end on digits: an identical twin teaches nothing; a CNN teaches an MLP."""

import json

import pytest
import torch

from brickwork.data import load_dataset
from brickwork.errors import BrickworkError
from brickwork.experiment import RunStore, execute, validate
from brickwork.experiment.artifacts import load_trained


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


MLP = {"name": "mlp", "width": 32, "depth": 2}
PRETRAIN = {"stage": "train", "epochs": 1, "lr": 0.01}


def run(runs_dir, models, stages):
    cfg = {"name": "transfer", "seed": 0, "threads": 1, "data": {"name": "digits"}, "models": models, "stages": stages}
    rec = execute(validate(cfg), RunStore(runs_dir), progress=False, echo=lambda s: None)
    assert rec.status == "completed"
    return rec, json.loads((rec.dir / "metrics.json").read_text()), (rec.dir / "report.md").read_text()


def test_an_identical_twin_teaches_nothing(runs_dir):
    """Two variants of one spec and seed are one model: no complementary knowledge, the partition gives
    every sample to the student's own self (ties), and KL to an identical distribution has a zero
    gradient (SGD: no Adam rescaling of rounding noise), so no prediction flips; the labels control moves."""
    twin = {"stage": "transfer", "teacher": {"b": "a"}, "methods": ["kl", "kl_dp", "labels"], "epochs": 1}
    twin |= {"optimizer": "sgd", "lr": 0.05, "weight_decay": 0.0, "schedule": "constant"}
    rec, metrics, report = run(runs_dir, {"a": MLP, "b": MLP}, [PRETRAIN, twin])
    m = metrics["b"]
    assert m["transfer_complementary"] == 0.0 and m["transfer_student_only"] == 0.0
    assert m["transfer_partition_teacher_share_supervised"] == 0.0
    for method in ("kl", "kl_dp"):
        assert m[f"transfer_{method}_knowledge_gain"] == m[f"transfer_{method}_knowledge_loss"] == 0.0
        assert m[f"transfer_{method}_transfer_delta"] == 0.0
    assert m["transfer_labels_knowledge_gain"] + m["transfer_labels_knowledge_loss"] > 0
    assert not any(k.startswith("transfer_") for k in metrics["a"])  # the teacher variant does nothing
    assert "### Knowledge transfer a -> b" in report and "| KL-Dist + DP |" in report
    # without keep, the variant's saved model is the pretrained one: the same as its twin
    a, b = (load_trained(RunStore(runs_dir), rec.id, v).model for v in "ab")
    assert all(torch.equal(t, b.state_dict()[k]) for k, t in a.state_dict().items())


def test_cnn_teaches_mlp_and_the_kept_student_is_saved(runs_dir, tb_epoch_losses):
    stage = {"stage": "transfer", "teacher": {"mlp": "cnn"}, "methods": ["kl_dp_unsup", "xekl"], "keep": "xekl"}
    stage |= {"epochs": 1, "lr": 0.003}
    models = {"cnn": {"name": "cnn", "channels": [8, 16], "blocks": 1}, "mlp": MLP}
    rec, metrics, report = run(runs_dir, models, [PRETRAIN, stage])
    m = metrics["mlp"]
    for method in ("kl_dp_unsup", "xekl"):
        delta = m[f"transfer_{method}_knowledge_gain"] - m[f"transfer_{method}_knowledge_loss"]
        assert m[f"transfer_{method}_transfer_delta"] == pytest.approx(delta, abs=1e-12)
        assert m[f"transfer_{method}_accuracy_after"] == pytest.approx(
            m["transfer_student_accuracy"] + m[f"transfer_{method}_transfer_delta"], abs=1e-12
        )
    assert 0 < m["transfer_complementary"] < 1
    if tb_epoch_losses:  # None without the tensorboard extra
        # TensorBoard: the pretraining and each method's transfer, one epoch each.
        curves = tb_epoch_losses(rec.dir, "mlp")
        assert {k: len(v) for k, v in curves.items()} == {
            "stage0-train": 1,
            "stage1-transfer-kl_dp_unsup": 1,
            "stage1-transfer-xekl": 1,
        }
    # kept: the saved variant is the XE-KL student, whose test accuracy the stage measured
    assert "continues as the xekl student" in report
    kept = load_trained(RunStore(runs_dir), rec.id, "mlp").model.eval()
    test = load_dataset("digits", seed=0).test
    with torch.no_grad():
        acc = int((kept(test.x).argmax(-1) == test.y).sum()) / len(test)
    assert acc == pytest.approx(m["transfer_xekl_accuracy_after"], abs=1e-12)


def test_bad_transfer_settings_are_one_line(runs_dir):
    models = {"a": MLP, "b": MLP}
    with pytest.raises(BrickworkError, match=r"keep='kl' is not one of methods \['kl_dp'\]"):
        bad = {"stage": "transfer", "teacher": {"b": "a"}, "methods": ["kl_dp"], "keep": "kl"}
        run(runs_dir, models, [PRETRAIN, bad])
    with pytest.raises(BrickworkError, match="cannot load variant 'b'.*list it before 'a'"):
        run(runs_dir, models, [PRETRAIN, {"stage": "transfer", "teacher": {"a": "b"}, "epochs": 1}])
