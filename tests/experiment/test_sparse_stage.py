"""The ``sparsify`` stage and the ``sparse_mlp`` model through the runner, on real data (digits)."""

import json

import pytest
import torch

from brickwork.experiment import RunStore, execute, validate


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread (and the config's ``threads`` is process-wide): restore after."""
    before = torch.get_num_threads()
    yield 1
    torch.set_num_threads(before)


def test_sparse_mlp_and_train_sparsify_finetune(runs_dir, one_thread):
    cfg = {
        "name": "sparse",
        "seed": 0,
        "threads": one_thread,
        "data": {"name": "digits"},
        "models": {
            "dense": {"name": "mlp", "width": 32, "depth": 1},
            "g2g": {
                "name": "sparse_mlp",
                "width": 32,
                "depth": 1,
                "groups": 4,
                "density": 0.5,
                "regrow": "hebbian",
                "level": "group",  # blocks move: the layer stays block-sparse (edge level is masked dense)
                "interval": 5,
            },
        },
        "stages": [
            {"stage": "train", "epochs": 2, "lr": 0.01},
            {"stage": "sparsify", "groups": 4, "density": 0.5, "regrow": "random", "interval": 5},
            {"stage": "train", "epochs": 1, "lr": 0.003},
            {"stage": "evaluate", "latency_repeats": 1},
        ],
    }
    rec = execute(validate(cfg), RunStore(runs_dir), progress=False, echo=lambda s: None)
    metrics = json.loads((rec.dir / "metrics.json").read_text())
    dense, g2g = metrics["dense"], metrics["g2g"]
    # Stem 64->32 and body 32->32 at half density in both; the head (32->10) stays dense.
    flops = 2 * ((64 * 32 + 32 * 32) // 2 + 32 * 10)
    assert dense["flops_per_sample"] == g2g["flops_per_sample"] == flops
    assert dense["sparsify_layers"] == 2 and g2g["sparsify_layers"] == 0  # already group-connected
    assert dense["sparsify_params_after"] < dense["sparsify_params_before"]
    assert 0.0 < dense["sparsify_kept_mass"] < 1.0 and dense["sparsify_val_accuracy"] > 0.3
    assert dense["test_accuracy"] > 0.5 and g2g["test_accuracy"] > 0.5
    # The fine-tuning train stage trained (it did not "resume" the dense run's finished state).
    history = json.loads((rec.dir / "dense" / "progress.json").read_text())["history"]
    assert len(history) == 3
    assert "weight mass kept" in (rec.dir / "report.md").read_text()


def test_resume_and_load_after_a_structural_stage(runs_dir, one_thread, tmp_path, killed_then_resumed):
    """A run interrupted in the fine-tuning after ``sparsify`` resumes bit-exactly, and its
    sparsified model reloads: the stage's structure is replayed before weights are loaded."""
    from brickwork.data import load_dataset
    from brickwork.experiment.artifacts import load_trained
    from brickwork.persist import load_tensors

    cfg = {
        "name": "sp",
        "seed": 0,
        "threads": one_thread,
        "data": {"name": "digits"},
        "models": {"dense": {"name": "mlp", "width": 32, "depth": 1}},
        "stages": [
            {"stage": "train", "epochs": 1, "lr": 0.01},
            {"stage": "sparsify", "groups": 4, "density": 0.5, "regrow": "random", "interval": 5},
            {"stage": "train", "epochs": 2, "lr": 0.003},
            {"stage": "evaluate", "latency_repeats": 1},
        ],
    }
    reference = execute(validate(cfg), RunStore(tmp_path / "ref"), progress=False, echo=lambda s: None)
    want, _ = load_tensors(reference.dir / "dense" / "model")

    # digits: 20 steps per epoch; stop inside the fine-tuning's 2nd epoch
    store, resumed = killed_then_resumed(cfg, runs_dir, 20 + 25)
    got, meta = load_tensors(resumed.dir / "dense" / "model")
    assert meta["structure"][0]["op"] == "sparsify"
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)

    trained = load_trained(store, resumed.id).model.eval()
    assert any(type(m).__name__ == "GroupLinear" for m in trained.modules())
    test = load_dataset("digits", seed=0).test
    with torch.no_grad():
        accuracy = float((trained(test.x).argmax(1) == test.y).float().mean())
    assert accuracy == pytest.approx(resumed.metrics["dense"]["test_accuracy"], abs=1e-6)  # float32 vs 64


def test_sparsify_stage_attaches_the_rewiring_it_is_given(tmp_path):
    """Every rewiring setting reaches the layers (``window`` and ``momentum`` could not be set before)."""
    from brickwork.data import load_dataset
    from brickwork.experiment.context import StageContext
    from brickwork.models import mlp
    from brickwork.nn.sparse import GroupLinear, RewiringSettings
    from brickwork.registry import REGISTRY

    data = load_dataset("digits", seed=0)
    settings = RewiringSettings(
        regrow="hebbian", level="group", interval=7, fraction=0.2, decay="linear", stop=0.5, window=3, momentum=0.9
    )
    ctx = StageContext(
        label="m",
        model=mlp(data.in_shape, data.num_classes, width=32, depth=1),
        data=data,
        dir=tmp_path,
        run_dir=tmp_path,
        seed=0,
        device="cpu",
    )
    REGISTRY.get("stage", "sparsify").obj(ctx, groups=4, density=0.5, rewiring=settings)
    layers = [m for m in ctx.model.modules() if isinstance(m, GroupLinear)]
    assert len(layers) == 2
    for layer in layers:
        assert layer.rewiring is not None
        assert layer.rewiring.config() == {
            "regrow": "hebbian",
            "level": "group",
            "interval": 7,
            "fraction": 0.2,
            "decay": "linear",
            "stop": 0.5,
            "window": 3,
            "momentum": 0.9,
        }
    assert layers[0].rewiring is not layers[1].rewiring  # each layer keeps its own statistics
