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
            "g2g": {"name": "sparse_mlp", "width": 32, "depth": 1, "groups": 4, "density": 0.5,
                    "regrow": "hebbian", "interval": 5},
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
