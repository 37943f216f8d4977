"""The ``grow_layers`` stage through the runner on real data (digits): phases, training FLOPs, the
from-scratch baseline matched in compute, and resume past the structural stage."""

import json

import pytest
import torch

from brickwork.errors import BrickworkError
from brickwork.experiment import RunStore, execute, validate


def _cfg(threads):
    return {
        "name": "grow",
        "seed": 0,
        "threads": threads,
        "data": {"name": "digits"},
        "models": {
            "grown": {"name": "mlp", "width": 16, "depth": 1},
            "scratch": {"name": "mlp", "width": 16, "depth": 3},
        },
        "stages": [
            {
                "stage": "grow_layers",
                "depth": 3,
                "epochs": 1,
                "first_epochs": 2,
                "lr": 0.01,
                "lora_rank": 2,
                "batch_size": 128,
            }
        ],
    }


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    yield 1
    torch.set_num_threads(before)


def test_grown_model_resumes_bit_exactly_and_reloads(
    runs_dir, one_thread, tmp_path, killed_then_resumed, tb_epoch_losses
):
    from brickwork.experiment.artifacts import load_trained
    from brickwork.persist import load_tensors

    cfg = _cfg(one_thread)
    cfg["models"].pop("scratch")
    ref = execute(validate(cfg), RunStore(tmp_path / "ref"), progress=False, echo=lambda s: None)
    want, _ = load_tensors(ref.dir / "grown" / "model")
    metrics = json.loads((ref.dir / "metrics.json").read_text())["grown"]
    # Hand count in multiply-accumulates per sample (x2 = FLOPs): digits has 1258 training samples; stem
    # 64->16 (frozen), body layers 16->16 (256), head 16->10 (160), LoRA rank 2 on a 16->16 layer: 32 + 32.
    # Backward of a trained linear: weight gradient (its size) + input gradient when something below trains;
    # of a LoRA branch: dB, du, dA (3 x 32) + dx (32) when something below trains.
    f0 = 2 * (1024 + 256 + 160) + 2 * (256 + 2 * 160)  # depth 1, all but the stem
    f1 = 2 * (1024 + 2 * 256 + 64 + 160) + 2 * (2 * 160 + 2 * 256 + 96)  # depth 2: layer 1, head, LoRA on 0
    f2 = 2 * (1024 + 3 * 256 + 2 * 64 + 160) + 2 * (2 * 160 + 2 * 256 + (256 + 128) + 96)  # depth 3
    assert metrics["train_flops"] == 1258 * (2 * f0 + f1 + f2)
    if tb_epoch_losses:  # None without the tensorboard extra
        # One TensorBoard folder per phase: 2 epochs at depth 1, then 1 per added layer.
        assert {k: len(v) for k, v in tb_epoch_losses(ref.dir, "grown").items()} == {
            "stage0-phase0": 2,
            "stage0-phase1": 1,
            "stage0-phase2": 1,
        }
    report = (ref.dir / "report.md").read_text()
    assert f"| 1 | 442 | 2 | {f0:,} |" in report and f"| 2 | {272 + 170 + 64} | 1 | {f1:,} |" in report

    # 10 steps per epoch: stop inside the last phase (depth 3)
    store, resumed = killed_then_resumed(cfg, runs_dir, 2 * 10 + 15)
    got, meta = load_tensors(resumed.dir / "grown" / "model")
    assert meta["structure"][0]["op"] == "grow_layers" and meta["structure"][0]["added"] == 2
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    trained = load_trained(store, resumed.id).model
    assert len(trained.body) == 3 and sum(type(m).__name__ == "LoRALinear" for m in trained.modules()) == 2


def test_the_scratch_baseline_matches_the_grown_variants_training_compute(runs_dir, one_thread):
    cfg = _cfg(one_thread)
    cfg["stages"] = [
        {"stage": "grow_layers", "depth": 3, "epochs": 3, "first_epochs": 1, "lr": 0.01, "batch_size": 256},
    ]
    cfg["stages"][0]["match_flops_of"] = "grown"
    rec = execute(validate(cfg), RunStore(runs_dir), progress=False, echo=lambda s: None)
    m = json.loads((rec.dir / "metrics.json").read_text())
    grown, scratch = m["grown"], m["scratch"]
    assert scratch["grow_layers_phases"] == 1 and grown["grow_layers_phases"] == 3
    # grown: 1 epoch at depth 1, then 3 epochs for each new layer (stem frozen, no LoRA): the backward
    # pass stops at the new layer (its weight gradient; no input gradient, nothing below trains)
    f0 = 2 * (1024 + 256 + 160) + 2 * (256 + 2 * 160)
    f1 = 2 * (1024 + 2 * 256 + 160) + 2 * (2 * 160 + 256)
    f2 = 2 * (1024 + 3 * 256 + 160) + 2 * (2 * 160 + 256)
    assert grown["train_flops"] == 1258 * (f0 + 3 * f1 + 3 * f2)
    # scratch at depth 3: forward, every weight gradient, input gradients above layer 0; as many
    # epochs as come closest to the grown variant's compute (4.62 epochs' worth: 5)
    step = 2 * (1024 + 3 * 256 + 160) + 2 * (2 * 160 + 2 * 256 * 2 + 256)
    assert round(grown["train_flops"] / (1258 * step)) == 5
    assert scratch["train_flops"] == 1258 * 5 * step and scratch["train_flops_budget"] == grown["train_flops"]


def test_growing_to_a_smaller_depth_is_refused(runs_dir, one_thread):
    cfg = _cfg(one_thread)
    cfg["stages"][0]["depth"] = 2
    cfg["models"].pop("grown")
    with pytest.raises(BrickworkError, match="depth 2 is below the model's depth 3"):
        execute(validate(cfg), RunStore(runs_dir), progress=False, echo=lambda s: None)
