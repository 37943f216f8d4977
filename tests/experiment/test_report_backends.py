"""A run report names the kernel each MoE / group-sparse layer class ran (kernels/autotune.py)."""

from __future__ import annotations

from typing import Any


def test_report_lists_the_backend_of_each_layer_class(tiny_config: dict[str, Any], runs_dir) -> None:
    from brickwork.experiment import RunStore, execute, validate

    tiny_config["models"] = {
        "moe": {"name": "moe_mlp", "width": 16, "depth": 1, "hidden": 16, "num_experts": 4, "top_k": 2},
        "sparse": {"name": "sparse_mlp", "width": 32, "depth": 1, "groups": 4, "density": 0.5},
    }
    tiny_config["stages"] = [
        {"stage": "train", "epochs": 1, "batch_size": 512},
        {"stage": "evaluate", "latency_repeats": 1},
    ]
    rec = execute(validate(tiny_config), RunStore(runs_dir), progress=False, echo=lambda s: None)
    line = next(x for x in (rec.dir / "report.md").read_text().splitlines() if x.startswith("Backends per layer"))
    # conftest pins moe=grouped_mm and sparse=band: the sparse_mlp's random wiring has no band, so gather.
    assert "moe " in line and "= grouped_mm (pinned)" in line
    assert "sparse " in line and "= gather (pinned)" in line and "fwd+bwd" in line
