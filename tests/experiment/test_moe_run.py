"""A routed model through the whole pipeline: aux losses weighted, routing report, FLOPs counted."""

import math

import pytest

from brickwork.data import load_dataset
from brickwork.experiment import RunStore, execute, validate


def _expert_assignments_per_sample(router: str, n: int, batch: int = 256, experts: int = 4, k: int = 2) -> float:
    """Expert assignments per token as evaluated in batches of ``batch`` (the evaluate stage's
    default): k for token choice; for expert choice E * ceil(n_b * k / E) per batch (Zhou et al.'s
    capacity, rounded up), which exceeds k on a batch whose n_b * k / E is not whole."""
    if router == "topk":
        return float(k)
    sizes = [min(batch, n - i) for i in range(0, n, batch)]
    return sum(experts * math.ceil(b * k / experts) for b in sizes) / n


@pytest.mark.parametrize("router", ["topk", "expert_choice", "dense_to_sparse"])
def test_moe_mlp_run_with_routing_report(tiny_config, runs_dir, router):
    tiny_config["models"] = {
        "moe": {
            "name": "moe_mlp",
            "width": 16,
            "depth": 1,
            "hidden": 8,
            "num_experts": 4,
            "top_k": 2,
            "router": router,
        },
        "dense": {"name": "moe_mlp", "width": 16, "depth": 1, "hidden": 16, "num_experts": 0},
    }
    tiny_config["aux_weights"] = {"load_balance": 0.01, "z_loss": 0.001}
    tiny_config["stages"] = [{"stage": "train", "epochs": 1}, {"stage": "evaluate"}, {"stage": "routing"}]
    rec = execute(validate(tiny_config), RunStore(runs_dir), progress=False, echo=lambda s: None)
    report = (rec.dir / "report.md").read_text()
    used = {k.removeprefix("aux_weight."): v for k, v in rec.metrics["moe"].items() if k.startswith("aux_weight.")}
    assert used and used == {k: tiny_config["aux_weights"][k] for k in used}  # the weights used, logged
    assert all(f"`{k}` {v:g} (config aux_weights)" in report for k, v in used.items())
    assert "routing-body_layers_0_ffn.png" in report and (rec.dir / "moe" / "routing-body_layers_0_ffn.png").exists()
    moe, dense = rec.metrics["moe"], rec.metrics["dense"]
    if router != "dense_to_sparse":  # the annealed gate runs a variable number of experts per token
        # The dense FFN (16 -> 16 -> 16) costs 2 * 2 * 16 * 16 per sample; the MoE the router (2 * 16 * 4)
        # plus 2 * 2 * 16 * 8 per expert assignment. Exact counts, compared exactly.
        n = len(load_dataset("digits", seed=0).test)
        assert n <= 1024  # every test sample is measured (the stage's flops_samples)
        per_assignment = 2 * 2 * 16 * 8
        expected = dense["flops_per_sample"] - 2 * 2 * 16 * 16 + 2 * 16 * 4
        expected += per_assignment * _expert_assignments_per_sample(router, n)
        assert moe["flops_per_sample"] == pytest.approx(expected, rel=1e-12)
    assert moe["params"] > dense["params"]
