"""A routed model through the whole pipeline: aux losses weighted, routing report, FLOPs counted."""

import pytest

from brickwork.experiment import RunStore, execute, validate


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
        # Equal active FFN width (2 experts x 8 = 16): executed FLOPs differ only by the router (16 x 4 x 2).
        assert moe["flops_per_sample"] == pytest.approx(dense["flops_per_sample"] + 2 * 16 * 4, rel=0.02)
    assert moe["params"] > dense["params"]
