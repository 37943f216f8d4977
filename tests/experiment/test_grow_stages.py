"""The ``grow``, ``upcycle`` and ``train_budget`` stages through the runner on real data (digits):
function preserved at each step, recipes replayed on reload, resume past every structural stage
bit-exact, training compute matched between variants."""

import json

import pytest
import torch

from brickwork.experiment import RunStore, execute, validate

STEPS = [
    {"stage": "train_budget", "epochs": 1, "lr": 0.01, "batch_size": 256},
    {"stage": "grow", "op": "deepen", "position": 1, "eval_samples": 32},
    {"stage": "grow", "op": "widen_ffn", "hidden": 24, "eval_samples": 32},
    {"stage": "grow", "op": "widen_residual", "factor": 2, "eval_samples": 32},
    {"stage": "upcycle", "experts": 4, "top_k": 2, "eval_samples": 32},
    {"stage": "grow", "op": "add_experts", "count": 2, "eval_samples": 32},
    {"stage": "train_budget", "epochs": 2, "lr": 0.01, "batch_size": 256},
]


def _cfg(threads, stages=STEPS):
    return {
        "name": "grow",
        "seed": 0,
        "threads": threads,
        "data": {"name": "digits"},
        "models": {"net": {"name": "moe_mlp", "width": 8, "depth": 1, "hidden": 16, "num_experts": 0}},
        "stages": stages,
    }


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    yield 1
    torch.set_num_threads(before)


def test_growth_stages_preserve_the_function_and_resume_bit_exactly(
    runs_dir, one_thread, tmp_path, killed_then_resumed
):
    from brickwork.experiment.artifacts import load_trained
    from brickwork.persist import load_tensors

    cfg = _cfg(one_thread)
    ref = execute(validate(cfg), RunStore(tmp_path / "ref"), progress=False, echo=lambda s: None)
    want, _ = load_tensors(ref.dir / "net" / "model")
    metrics = json.loads((ref.dir / "metrics.json").read_text())["net"]
    for k in ("grow", "upcycle"):
        assert metrics[f"{k}_max_output_change"] < 1e-4  # float32 round-off only
    assert metrics["grow_params_after"] > metrics["grow_params_before"]
    assert metrics["train_flops"] == metrics["train_flops_stage0"] + metrics["train_flops_stage6"]
    assert sum(k.startswith("body.layers.1.ffn.experts") for k in want) and want["body.layers.0.norm.weight"].shape == (
        16,
    )

    # 5 steps per epoch: stop inside the last training, past every growth step
    store, resumed = killed_then_resumed(cfg, runs_dir, 5 + 7)
    got, _ = load_tensors(resumed.dir / "net" / "model")
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    loaded = load_trained(store, resumed.id)  # the recipes replayed on a fresh model, weights loaded strictly
    assert len(loaded.model.body) == 2


def test_train_budget_matches_another_variants_training_compute(runs_dir, one_thread, tb_epoch_losses):
    stages = [
        {"stage": "train_budget", "epochs": 1, "lr": 0.01, "batch_size": 128},
        {"stage": "upcycle", "experts": 4, "top_k": 2, "variants": ["moe"], "eval_samples": 32},
        {"stage": "train_budget", "epochs": 2, "lr": 0.01, "batch_size": 128, "match": "moe"},
    ]
    cfg = _cfg(one_thread, stages)
    net = cfg["models"].pop("net")
    cfg["models"] = {"moe": net, "dense": dict(net)}
    run = execute(validate(cfg), RunStore(runs_dir), progress=False, echo=lambda s: None)
    m = json.loads((run.dir / "metrics.json").read_text())
    moe, dense = m["moe"], m["dense"]
    assert moe["train_flops_stage0"] == dense["train_flops_stage0"]  # the same pretraining
    assert dense["train_flops_budget_stage2"] == moe["train_flops_stage2"]
    per_epoch = dense["train_flops_stage0"]  # one epoch of the dense model
    epochs = dense["train_flops_stage2"] / per_epoch
    assert epochs == round(moe["train_flops_stage2"] / per_epoch) > 2  # cheaper steps: more epochs, same compute
    if tb_epoch_losses:  # None without the tensorboard extra
        # TensorBoard: each train_budget stage's curve, as many epochs as it ran.
        curves = tb_epoch_losses(run.dir, "dense")
        want = {"stage0-train_budget": 1, "stage2-train_budget": round(epochs)}
        assert {k: len(v) for k, v in curves.items()} == want


def test_grow_and_upcycle_verbs_write_checkpoints_that_reload(runs_dir, one_thread, capsys):
    from brickwork.cli import main
    from brickwork.experiment.build import load

    cfg = _cfg(one_thread, [{"stage": "train", "epochs": 1, "lr": 0.01, "batch_size": 256}])
    rec = execute(validate(cfg), RunStore(runs_dir), progress=False, echo=lambda s: None)
    base = ["--runs-dir", str(runs_dir)]
    assert main([*base, "grow", rec.id, "--op", "deepen", "--position", "0"]) == 0
    out = capsys.readouterr().out
    assert "max |grown - original| = 0.00e+00" in out  # a zero output projection adds exact zeros
    deeper = rec.dir / "net" / "grow-deepen"
    assert len(load(deeper).model.body) == 2
    # a checkpoint as the source, then a second structural step on top of the first
    assert main([*base, "upcycle", str(deeper), "--experts", "4", "--top-k", "2"]) == 0
    moe = load(rec.dir / "net" / "upcycle-e4-k2")
    assert [r["op"] for r in moe.meta["structure"]] == ["grow", "upcycle"]
    assert moe.meta["max_abs_change"] < 1e-5
    # bad input: one line, exit 2, nothing written
    assert main([*base, "grow", rec.id, "--op", "widen_ffn", "--hidden", "8"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        "brickwork grow: error: grow: body.layers.0.ffn (hidden) has 16 units; growing needs more than 16, got 8"
    )
    assert main([*base, "grow", rec.id, "--op", "split_expert", "--layer", "0", "--expert", "9"]) == 2
    assert "not a mixture of experts" in capsys.readouterr().err
    assert main([*base, "grow", rec.id, "--op", "deepen", "--position", "0"]) == 2
    assert "never overwrites" in capsys.readouterr().err
