"""The depth stages end to end on real data (digits): nested sub-networks with their separately
trained baselines, early exits, chains and layer importance, stitching."""

import json

import pytest
import torch
from torch.nn.functional import cross_entropy

from brickwork.analysis.compute import accuracy_and_flops
from brickwork.data import load_dataset
from brickwork.data.batching import batches
from brickwork.experiment import RunStore, execute, validate
from brickwork.experiment.artifacts import load_trained
from brickwork.experiment.build import load
from brickwork.train.loop import evaluate


@pytest.fixture(autouse=True)
def _restore_threads():
    """The runs below ask for one thread (config ``threads: 1``); give other tests torch's setting back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def run(runs_dir, models, stages):
    cfg = {"name": "depth", "seed": 0, "threads": 1, "data": {"name": "digits"}, "models": models, "stages": stages}
    rec = execute(validate(cfg), RunStore(runs_dir), progress=False, echo=lambda s: None)
    assert rec.status == "completed"
    return rec, json.loads((rec.dir / "metrics.json").read_text()), (rec.dir / "report.md").read_text()


def test_nested_subnetworks_and_separate_baselines(runs_dir, tb_epoch_losses):
    model = {"name": "nested_mlp", "width": 32, "depth": 2, "widths": [0.5, 1.0], "depths": [1, 2], "samples": 3}
    rec, metrics, report = run(
        runs_dir,
        {"sn": model},
        [
            {"stage": "train", "epochs": 3, "lr": 0.01},
            {"stage": "nested", "latency_repeats": 1},
            {"stage": "nested_baselines", "epochs": 3, "lr": 0.01},
        ],
    )
    m = metrics["sn"]
    assert m["nested_subnetworks"] == 4 and m["nested_slice_max_error"] <= 1e-5
    assert m["nested_min_accuracy"] > 0.5  # far above chance (0.1) on digits
    # the summary metrics recomputed from the saved supernet and the saved separate models
    test = load_dataset("digits", seed=0).test
    supernet = load_trained(RunStore(runs_dir), rec.id, "sn").model
    ratios = []
    for w, d in [(0.5, 1), (0.5, 2), (1.0, 1), (1.0, 2)]:
        with supernet.at(w, d):
            nested_acc = evaluate(supernet, test, cross_entropy)["accuracy"]
        separate = load(rec.dir / "sn" / f"stage2-baseline-w{w:g}-d{d}" / "model").model
        ratios.append(nested_acc / evaluate(separate, test, cross_entropy)["accuracy"])
    assert m["nested_min_ratio"] == pytest.approx(min(ratios), rel=1e-12)
    assert m["nested_subnets_at_target"] == sum(r >= 0.96 for r in ratios)  # the stage's default target
    assert "separately trained" in report and "| w0.5-d1 |" in report
    assert (rec.dir / "plots" / "nested-sn-latency.png").exists()
    assert (rec.dir / "sn" / "stage2-baseline-w0.5-d1" / "model.safetensors").exists()
    if tb_epoch_losses:  # None without the tensorboard extra
        # TensorBoard: the supernet's training and each separately trained baseline, 3 epochs each.
        baselines = {f"stage2-baseline-w{w:g}-d{d}": 3 for w, d in [(0.5, 1), (0.5, 2), (1.0, 1), (1.0, 2)]}
        assert {k: len(v) for k, v in tb_epoch_losses(rec.dir, "sn").items()} == {"stage0-train": 3, **baselines}


def test_early_exits_choose_and_save_an_operating_threshold(runs_dir):
    model = {"name": "early_exit", "base": {"name": "mlp", "width": 32, "depth": 3}, "objective": "jei"}
    rec, metrics, report = run(
        runs_dir,
        {"ee": model},
        [
            {"stage": "train", "epochs": 3, "lr": 0.01},
            {"stage": "exits", "thresholds": [0.99, 0.9, 0.5], "latency_repeats": 1, "max_drop": 0.02},
            {"stage": "evaluate", "latency_repeats": 1},
        ],
    )
    m = metrics["ee"]
    assert m["exit_accuracy_drop"] == pytest.approx(m["exit_full_accuracy"] - m["exit_accuracy"], abs=1e-12)
    assert m["exit_accuracy_drop"] <= 0.05
    # The threshold sweep's per-path prices equal what the dispatcher counts in the compacting forward.
    assert m["exit_sweep_flops_error"] < 1e-9 and m["exit_sweep_accuracy_error"] < 2e-3
    assert "ECE" in report and "| gate |" in report
    # conformal sets at the chosen exit (alpha 0.1 by default): the coverage of the digits test split
    assert m["exit_conformal_coverage"] >= 0.8 and 0.0 < m["exit_conformal_set_size"] <= 10.0
    assert "Conformal prediction sets" in report
    trained = load_trained(RunStore(runs_dir), rec.id, "ee")
    assert float(trained.model.threshold) == m["exit_threshold"]  # the operating point is in the checkpoint
    assert m["test_accuracy"] == pytest.approx(m["exit_accuracy"])  # evaluate measures that operating point
    # the saving is against the same model at full depth (threshold 1.0 never exits), counted here
    test = load_dataset("digits", seed=0).test
    trained.model.threshold.fill_(1.0)
    full_acc, full_flops = accuracy_and_flops(trained.model, batches(test.x, test.y, 256))
    assert full_acc == pytest.approx(m["exit_full_accuracy"], abs=1e-6)  # the stage's is a float32 mean
    assert m["exit_flops_saving"] == pytest.approx(1 - m["flops_per_sample"] / full_flops, rel=1e-9)


def test_chains_and_layer_importance(runs_dir):
    model = {"name": "vit", "dim": 16, "depth": 3, "heads": 2, "patch": 4}
    rec, metrics, report = run(
        runs_dir,
        {"vit": model},
        [
            {"stage": "train", "epochs": 2, "lr": 0.01},
            {"stage": "chains", "search_samples": 128, "oracle_samples": 64, "latency_repeats": 1, "max_repeat": 1},
            {"stage": "layer_importance", "samples": 64, "latency_repeats": 1, "max_drop_layers": 1},
            {"stage": "chains", "search_samples": 128, "oracle_samples": 0, "latency_repeats": 1, "max_repeat": 1,
             "search": "mcts", "evaluations": 5},
        ],
    )  # fmt: skip
    m = metrics["vit"]
    assert m["chain_flops_saving"] >= 0 and 0 <= m["chain_oracle_relative_flops"] <= 1
    assert "Per-sample oracle" in report and "| attention | 2 |" in report
    assert m["chain_search"] == "mcts" and m["chains_evaluated"] <= 5 and "MCTS (budget 5 chains" in report
    assert (rec.dir / "plots" / "chains-vit-flops.png").exists()


def test_stitching_two_variants_of_a_run(runs_dir, tb_epoch_losses):
    rec, metrics, report = run(
        runs_dir,
        {"small": {"name": "mlp", "width": 16, "depth": 2}, "large": {"name": "mlp", "width": 32, "depth": 4}},
        [
            {"stage": "train", "epochs": 2, "lr": 0.01},
            {"stage": "stitch", "front": "small", "fit_samples": 256, "epochs": 1, "latency_repeats": 1},
        ],
    )
    assert "Stitched family between small and large" in report
    assert "| small[:1]+large[2:] |" in report and "| large[:2]+small[1:] |" in report  # both directions
    assert report.count("### Stitched family") == 1  # the front variant itself does nothing
    if tb_epoch_losses:  # None without the tensorboard extra
        # TensorBoard: one folder per fine-tuned stitching layer, named by the cut.
        stitches = {k for k in tb_epoch_losses(rec.dir, "large") if k.startswith("stage1-")}
        assert "stage1-small1-large2" in stitches and "stage1-large2-small1" in stitches
