"""The runner end to end on real data (digits), interruption, and exact resume."""

import json

import pytest
import torch

import brickwork.train.loop as loop
from brickwork.experiment import RunStore, execute, validate
from brickwork.persist import load_tensors


def run(cfg, runs_dir, **kw):
    return execute(validate(cfg), RunStore(runs_dir), progress=False, echo=lambda s: None, **kw)


def test_run_writes_folder_report_and_store_entry(tiny_config, runs_dir):
    tiny_config["models"]["cnn"] = {"name": "cnn", "channels": [4, 8]}
    rec = run(tiny_config, runs_dir)
    assert rec.status == "completed"
    d = rec.dir
    for f in (
        "config.yaml",
        "metrics.json",
        "report.md",
        "plots/curves.png",
        "plots/accuracy_vs_flops.png",
        "mlp/model.safetensors",
        "mlp/model.json",
        "cnn/model.safetensors",
    ):
        assert (d / f).exists(), f
    metrics = json.loads((d / "metrics.json").read_text())
    m = metrics["mlp"]
    assert m["test_accuracy"] > 0.5  # three epochs on digits: far above chance (0.1)
    assert m["flops_per_sample"] == 2 * (64 * 32 + 2 * 32 * 32 + 32 * 10)
    assert rec.metrics == metrics
    report = (d / "report.md").read_text()
    assert "| mlp |" in report and "accuracy_vs_flops.png" in report
    _, meta = load_tensors(d / "mlp" / "model")
    assert meta["model"]["name"] == "mlp" and meta["data"]["num_classes"] == 10


def interrupt_after(monkeypatch, steps: int) -> None:
    real = loop.train_step
    calls = {"n": 0}

    def step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > steps:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", step)


def test_interrupted_run_is_recorded_and_resume_is_exact(tiny_config, runs_dir, monkeypatch, tmp_path):
    tiny_config["models"]["two"] = {"name": "mlp", "width": 16, "depth": 1, "dropout": 0.2}
    reference = run(tiny_config, tmp_path / "reference")
    ref = {label: load_tensors(reference.dir / label / "model")[0] for label in tiny_config["models"]}

    # Interrupt in the middle of the second model's second epoch (digits: 20 steps/epoch).
    interrupt_after(monkeypatch, 3 * 20 + 25)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_config, runs_dir)
    store = RunStore(runs_dir)
    (rec,) = store.list()
    assert rec.status == "interrupted"
    monkeypatch.undo()

    resumed = execute(None, store, resume=rec.id, progress=False, echo=lambda s: None)
    assert resumed.status == "completed"
    for label, tensors in ref.items():
        got, _ = load_tensors(resumed.dir / label / "model")
        for k, v in tensors.items():
            assert torch.equal(got[k], v), f"{label}.{k} differs after resume"
    assert resumed.metrics["two"]["test_accuracy"] == reference.metrics["two"]["test_accuracy"]


def test_failed_run_is_recorded(tiny_config, runs_dir, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(loop, "train_step", boom)
    with pytest.raises(RuntimeError):
        run(tiny_config, runs_dir)
    (rec,) = RunStore(runs_dir).list()
    assert rec.status == "failed" and "disk on fire" in rec.error


def test_completed_run_cannot_be_resumed(tiny_config, runs_dir):
    rec = run(tiny_config, runs_dir)
    from brickwork.errors import BrickworkError

    with pytest.raises(BrickworkError, match="already completed"):
        execute(None, RunStore(runs_dir), resume=rec.id, progress=False, echo=lambda s: None)


def test_load_trained_rebuilds_the_model(tiny_config, runs_dir):
    from brickwork.data import load_dataset
    from brickwork.errors import CheckpointError
    from brickwork.experiment.artifacts import load_trained

    rec = run(tiny_config, runs_dir)
    trained = load_trained(RunStore(runs_dir), rec.id)
    assert trained.label == "mlp" and trained.spec.args["width"] == 32
    x = load_dataset("digits", seed=0).test.x[:8]
    trained.model.eval()
    logits = trained.model(x)
    assert logits.shape == (8, 10)
    with pytest.raises(CheckpointError, match="no model 'nope'"):
        load_trained(RunStore(runs_dir), rec.id, "nope")


def test_several_seeds_report_mean_and_std(tiny_config, runs_dir):
    tiny_config["seeds"] = [0, 1]
    tiny_config["stages"][0]["epochs"] = 1
    rec = run(tiny_config, runs_dir)
    m = rec.metrics["mlp"]
    assert m["seeds"] == 2 and "test_accuracy_std" in m
    per_seed = [json.loads((rec.dir / "mlp" / f"seed-{s}" / "progress.json").read_text())["metrics"] for s in (0, 1)]
    accs = [p["test_accuracy"] for p in per_seed]
    assert accs[0] != accs[1]  # different initialisations
    assert m["test_accuracy"] == pytest.approx(sum(accs) / 2)
    assert " ± " in (rec.dir / "report.md").read_text()


def test_a_structurally_changed_model_reloads_through_the_one_loader(tiny_config, runs_dir):
    """A sparsified model, saved by the runner and rebuilt by ``build.load`` (recipe replayed, weights
    verified), computes exactly what the run's own model computed: the same outputs bit for bit."""
    from brickwork.data import load_dataset
    from brickwork.experiment.artifacts import load_trained
    from brickwork.experiment.build import apply_structure, build_model, load, model_spec, rebuild

    tiny_config["stages"] = [
        {"stage": "train", "epochs": 1, "lr": 0.01},
        {"stage": "sparsify", "groups": 4, "density": 0.5, "regrow": "random", "interval": 5},
        {"stage": "train", "epochs": 1, "lr": 0.003},
        {"stage": "evaluate", "latency_repeats": 1},
    ]
    rec = run(tiny_config, runs_dir)
    stem = rec.dir / "mlp" / "model"
    ckpt = load(stem)
    assert ckpt.meta["structure"][0]["op"] == "sparsify" and ckpt.spec == model_spec(ckpt.meta["model"])
    saved, _ = load_tensors(stem)
    assert ckpt.model.state_dict().keys() == saved.keys()
    assert all(torch.equal(ckpt.model.state_dict()[k], v) for k, v in saved.items())
    test = load_dataset("digits", seed=0).test
    ckpt.model.eval()
    trained = load_trained(RunStore(runs_dir), rec.id).model.eval()
    with torch.no_grad():
        assert torch.equal(ckpt.model(test.x), trained(test.x))
        # The in-run model's test accuracy, recomputed from the reloaded one: every prediction the same.
        hits = int((ckpt.model(test.x).argmax(-1) == test.y).sum())
    assert hits / len(test) == rec.metrics["mlp"]["test_accuracy"]
    # Without the recipe the dense skeleton does not take the sparse weights.
    plain = build_model(ckpt.spec, (1, 8, 8), 10)
    assert type(rebuild(ckpt.meta).body) is type(apply_structure(plain, ckpt.meta["structure"]).body)
    from brickwork.errors import CheckpointError

    with pytest.raises(CheckpointError, match="weights do not match"):
        load(stem, {**ckpt.meta, "structure": []})
    with pytest.raises(CheckpointError, match="cannot rebuild"):
        rebuild({**ckpt.meta, "structure": [{"op": "teleport"}]})
