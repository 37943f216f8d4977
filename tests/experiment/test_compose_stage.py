"""The ``compose`` stage on real data (digits): specialists on class groups, composed by logit
averaging; the training FLOPs of every specialist summed; resume and reload past the stage."""

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


def _cfg(threads):
    return {
        "name": "compose",
        "seed": 0,
        "threads": threads,
        "data": {"name": "digits"},
        "models": {"m": {"name": "mlp", "width": 16, "depth": 1}},
        "stages": [
            {"stage": "compose", "specialists": 2, "split": "classes", "epochs": 1, "batch_size": 128, "lr": 0.02},
        ],
    }


def test_specialists_compose_resume_bit_exactly_and_reload(
    runs_dir, one_thread, tmp_path, killed_then_resumed, tb_epoch_losses
):
    from brickwork.data import load_dataset
    from brickwork.experiment.artifacts import load_trained
    from brickwork.persist import load_tensors

    cfg = _cfg(one_thread)
    ref = execute(validate(cfg), RunStore(tmp_path / "ref"), progress=False, echo=lambda s: None)
    want, _ = load_tensors(ref.dir / "m" / "model")
    m = json.loads((ref.dir / "metrics.json").read_text())["m"]
    # Each specialist: frozen stem 64->16, body 16->16, head 16->10; forward + weight gradients of body
    # and head + the head's input gradient, per sample (x2 FLOPs per multiply-accumulate), 1 epoch
    # over its part of the 1258 training samples (classes 0-4 and 5-9).
    step = 2 * (1024 + 256 + 160) + 2 * (256 + 2 * 160)
    assert m["train_flops"] == 1258 * step
    assert {"specialist0_val_accuracy", "specialist1_val_accuracy", "compose_val_accuracy"} <= m.keys()
    if tb_epoch_losses:  # None without the tensorboard extra
        # Each specialist's training curve in its own TensorBoard folder, equal to the history it recorded.
        history = json.loads((ref.dir / "m" / "progress.json").read_text())["history"]
        curves = {f"stage0-specialist{i}": [h["train_loss"] for h in history if h["specialist"] == i] for i in (0, 1)}
        assert tb_epoch_losses(ref.dir, "m") == {k: pytest.approx(v, rel=1e-6) for k, v in curves.items()}
        assert all(len(v) == 1 for v in curves.values())

    # 5 steps per specialist (620 and 638 samples): stop inside the second one
    store, resumed = killed_then_resumed(cfg, runs_dir, 5 + 2)
    got, meta = load_tensors(resumed.dir / "m" / "model")
    assert meta["structure"] == [{"op": "compose", "members": 2, "combine": "logits", "share_stem": True}]
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)

    trained = load_trained(store, resumed.id).model.eval()
    assert type(trained).__name__ == "Ensemble" and trained.members[0].stem is trained.members[1].stem
    val = load_dataset("digits", seed=0).val
    with torch.no_grad():  # the composed model runs the shared stem once: 64->16, then two bodies and heads
        accuracy = float((trained(val.x).argmax(1) == val.y).float().mean())
    assert accuracy == pytest.approx(resumed.metrics["m"]["compose_val_accuracy"], abs=1e-6)


def test_class_split_of_a_language_model_is_refused(runs_dir, one_thread):
    cfg = _cfg(one_thread)
    cfg["data"] = {"name": "hamlet", "seq_len": 16}
    cfg["models"] = {"m": {"name": "transformer_lm", "dim": 8, "depth": 1, "heads": 2}}
    with pytest.raises(BrickworkError, match="split 'classes' needs a classification task"):
        execute(validate(cfg), RunStore(runs_dir), progress=False, echo=lambda s: None)
