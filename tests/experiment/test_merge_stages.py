"""The init_seed, align, lmc and merge stages end to end on digits, and the ``brickwork merge`` verb."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from brickwork.analysis import parameter_distance, reset_batch_norm
from brickwork.cli import main
from brickwork.data import load_dataset
from brickwork.data.batching import input_batches
from brickwork.errors import BrickworkError, ConfigError
from brickwork.experiment import RunStore, execute, validate
from brickwork.experiment.artifacts import load_trained
from brickwork.experiment.build import load


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


MLP = {"name": "mlp", "width": 32, "depth": 2}


def run(runs_dir, stages, models=None, **top):
    models = models or {"a": MLP, "b": MLP}
    cfg = {"name": "merge", "seed": 0, "threads": 1, "data": {"name": "digits"}, "models": models, "stages": stages}
    cfg |= top  # further top-level keys, e.g. seeds
    rec = execute(validate(cfg), RunStore(runs_dir), progress=False, echo=lambda s: None)
    assert rec.status == "completed"
    return rec, json.loads((rec.dir / "metrics.json").read_text()), (rec.dir / "report.md").read_text()


def test_identical_variants_have_zero_barrier_and_merge_to_themselves(runs_dir, tmp_path, capsys):
    """Without init_seed, two variants of one spec are the same model: the naive barrier is exactly 0,
    and their linear merge is that model, bit for bit; the verb gives the same file and refuses to overwrite."""
    rec, metrics, report = run(
        runs_dir,
        [
            {"stage": "train", "epochs": 1, "lr": 0.01},
            {"stage": "lmc", "other": "a", "align": ["none"], "points": 3},
            {"stage": "merge", "models": ["a"], "method": "linear"},
        ],
    )
    m = metrics["b"]
    assert m["lmc_none_loss_barrier"] == 0.0 and m["lmc_none_accuracy_barrier"] == 0.0
    assert "lmc_none_loss_barrier" not in metrics["a"]  # the reference itself does nothing
    a, b = load_trained(RunStore(runs_dir), rec.id, "a").model, load_trained(RunStore(runs_dir), rec.id, "b").model
    merged = load(rec.dir / "b" / "stage2-merged-linear").model  # a new checkpoint, loadable
    assert all(torch.equal(t, b.state_dict()[k]) for k, t in merged.state_dict().items())
    assert report.count("### Linear mode connectivity: a to b") == 1 and "### Merge of b, a (linear" in report
    assert (rec.dir / "plots" / "lmc-b.png").exists()

    out = tmp_path / "merged"
    assert main(["--runs-dir", str(runs_dir), "merge", f"{rec.id}:a", f"{rec.id}:b", "--out", str(out)]) == 0
    via_verb = load(out / "model").model
    assert all(torch.equal(t, a.state_dict()[k]) for k, t in via_verb.state_dict().items())
    meta = json.loads((out / "model.json").read_text())
    assert meta["merge"]["method"] == "linear" and [len(i["sha256"]) for i in meta["merge"]["inputs"]] == [64, 64]
    capsys.readouterr()
    assert main(["--runs-dir", str(runs_dir), "merge", f"{rec.id}:a", f"{rec.id}:b", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    bad = ["--runs-dir", str(runs_dir), "merge", f"{rec.id}:a", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")]
    assert main(bad) == 2
    assert not (tmp_path / "o2").exists()


def test_two_seeds_align_merge_evaluate(runs_dir):
    rec, metrics, report = run(
        runs_dir,
        [
            {"stage": "init_seed", "seeds": {"b": 1}},
            {"stage": "train", "epochs": 2, "lr": 0.01},
            {"stage": "lmc", "other": "a", "points": 5, "samples": 256},
            {"stage": "align", "to": "a", "method": "weight"},
            {"stage": "merge", "models": ["a"], "method": "linear", "adopt": True},
            {"stage": "evaluate", "latency_repeats": 1},
        ],
    )
    m = metrics["b"]
    assert m["init_seed"] == 1
    for method in ("none", "weight", "activation"):
        assert m[f"lmc_{method}_loss_barrier"] >= 0
    assert m["lmc_none_loss_barrier"] > 0  # different initialisations: a real barrier
    assert m["lmc_weight_loss_barrier"] < m["lmc_none_loss_barrier"]
    assert m["align_max_output_change"] <= 1e-5 and m["align_distance_after"] < m["align_distance_before"]
    # adopted: the variant's final model is the merge, evaluated by the next stage; its own weights kept aside
    assert m["test_accuracy"] == pytest.approx(m["merge_linear_accuracy"])
    b = load_trained(RunStore(runs_dir), rec.id, "b").model
    merged = load(rec.dir / "b" / "stage4-merged-linear").model
    assert parameter_distance(b, merged) == 0.0
    before = load(rec.dir / "b" / "stage4-before-merge").model
    assert parameter_distance(before, merged) > 0
    assert "### b aligned to a (weight matching)" in report and "weight matching" in report


def test_init_seed_relative_gives_each_repetition_its_own_pair(runs_dir):
    """Repeated over run seeds, a relative offset gives b the run's seed + offset: with offset 1 and
    nothing trained, b of run seed 0 starts exactly as a of run seed 1, and every pair differs."""
    rec, metrics, _ = run(runs_dir, [{"stage": "init_seed", "seeds": {"b": 1}, "relative": True}], seeds=[0, 1])
    models = {(v, s): load_trained(RunStore(runs_dir), rec.id, v, seed=s).model for v in "ab" for s in (0, 1)}
    assert parameter_distance(models["b", 0], models["a", 1]) == 0.0
    assert all(parameter_distance(models["a", s], models["b", s]) > 0 for s in (0, 1))
    assert metrics["b"]["init_seed"] == 1.5  # mean of 1 and 2


def test_a_variant_listed_later_is_refused_with_one_message(runs_dir):
    with pytest.raises(BrickworkError, match="cannot load variant 'b' of this run.*list it before 'a'"):
        run(runs_dir, [{"stage": "train", "epochs": 1}, {"stage": "merge", "models": {"a": ["b"]}}])


def test_verb_merges_plain_safetensors_files(tmp_path, capsys):
    a = {"w": torch.randn(3, 4), "b": torch.randn(4)}
    b = {"w": torch.randn(3, 4), "b": torch.randn(4)}
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    out = tmp_path / "out"
    args = ["merge", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--out", str(out)]
    assert main([*args, "--method", "task_arithmetic", "--base", str(tmp_path / "a.safetensors")]) == 0
    merged = load_file(str(out / "model.safetensors"))
    assert torch.equal(merged["w"], b["w"]) and torch.equal(merged["b"], b["b"])  # a + (a - a) + (b - a)
    capsys.readouterr()
    args[-1] = str(tmp_path / "out2")
    assert main([*args, "--option", "density"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
    bad_density = [*args, "--method", "ties", "--base", str(tmp_path / "a.safetensors"), "--option", "density=2"]
    assert main(bad_density) == 2
    assert "density" in capsys.readouterr().err and not (tmp_path / "out2").exists()  # nothing left behind


def rec_data():
    return load_dataset("digits", seed=0)  # the run's data: same name and seed, same split


def test_cnn_with_batch_norm_statistics_reset_on_the_path(runs_dir):
    cnn = {"name": "cnn", "channels": [4, 8], "norm": "batch"}
    rec, metrics, report = run(
        runs_dir,
        [
            {"stage": "init_seed", "seeds": {"b": 1}},
            {"stage": "train", "epochs": 1, "lr": 0.01},
            {"stage": "lmc", "other": "a", "align": ["none", "weight"], "points": 3, "samples": 256},
            {"stage": "align", "to": "a", "method": "activation", "samples": 256},
            {"stage": "merge", "models": ["a"], "align": "weight", "samples": 256},
        ],
        models={"a": cnn, "b": cnn},
    )
    m = metrics["b"]
    # the merged model's batch-norm statistics are those recomputed on the first 256 training rows
    merged = load(rec.dir / "b" / "stage4-merged-linear").model
    again = reset_batch_norm(copy.deepcopy(merged), list(input_batches(rec_data().train.x, 256, limit=256)))
    for k, t in merged.state_dict().items():
        if "running" in k:
            assert torch.allclose(t, again.state_dict()[k], rtol=1e-5, atol=1e-6), k
    assert "interior points recomputed on training data" in report
    assert m["lmc_none_loss_barrier"] >= 0 and m["lmc_weight_loss_barrier"] >= 0
    assert m["align_max_output_change"] <= 1e-4  # batch-norm statistics permuted with their channels


def test_task_merge_of_two_identical_fine_tunes_keeps_each_task(runs_dir, tb_epoch_losses):
    """The same task twice: both fine-tuned models are one model, so every merge returns it and
    every normalised accuracy is 1 (exactly, for methods that merge copies exactly)."""
    rec, metrics, report = run(
        runs_dir,
        [
            {
                "stage": "task_merge",
                "other_data": {"name": "digits"},
                "methods": ["linear", "ties", "fisher", "regmean"],
                # digits' corner pixels are always 0: the stem's Gram matrix is singular; RegMean's
                # ridge (default 1e-6) makes the solve defined
                "options": {"ties": {"density": 1.0}},
                "epochs": 1,
                "lr": 0.01,
                "samples": 64,
            }
        ],
        models={"a": MLP},
    )
    m = metrics["a"]
    for method in ("linear", "ties", "fisher"):
        assert m[f"task_merge_{method}_normalised_digits"] == 1.0
        assert m[f"task_merge_{method}_normalised_digits-2"] == 1.0
    assert m["task_merge_regmean_normalised_mean"] == pytest.approx(1.0, abs=0.01)  # a solve, not a copy
    assert "### Multi-task merge: fine-tuned on digits and digits-2" in report
    if tb_epoch_losses:  # None without the tensorboard extra
        # TensorBoard: each task's fine-tuning in its own folder, one epoch each.
        curves = tb_epoch_losses(rec.dir, "a")
        assert {k: len(v) for k, v in curves.items()} == {"stage0-finetune-digits": 1, "stage0-finetune-digits-2": 1}


def test_task_merge_refuses_data_of_another_shape(runs_dir):
    with pytest.raises(BrickworkError, match="task_merge: mnist5k has inputs \\(1, 28, 28\\)"):
        run(runs_dir, [{"stage": "task_merge", "other_data": {"name": "mnist5k"}, "epochs": 1}], models={"a": MLP})


def test_task_merge_chooses_each_methods_options_on_validation(runs_dir):
    """Two different tasks of one shape (digits, and rotation prediction on digits' training images),
    fresh classifiers (10 and 4 classes): with ``split: val`` the reported figure of a method with a
    grid is the best of its grid on val (the choice), and the chosen values are recorded."""
    rec, metrics, report = run(
        runs_dir,
        [
            {
                "stage": "task_merge",
                "tasks": [{"name": "digits"}, {"name": "rotations", "sources": [{"name": "digits"}]}],
                "data_seed": 0,
                "methods": ["task_arithmetic", "regmean"],
                "grid": {"task_arithmetic": {"scale": [0.2, 1.0, 3.0]}, "regmean": {"alpha": [0.5, 1.0]}},
                "probe_epochs": 1,
                "epochs": 1,
                "lr": 0.01,
                "samples": 64,
                "split": "val",
            }
        ],
        models={"a": MLP},
    )
    m = metrics["a"]
    rows = {r["method"]: r for r in json.loads((rec.dir / "a" / "stage0-task-merge.json").read_text())["rows"]}
    for method, key, grid in (("task_arithmetic", "scale", [0.2, 1.0, 3.0]), ("regmean", "alpha", [0.5, 1.0])):
        assert rows[method]["searched"] == len(grid)
        assert rows[method]["norm_mean"] == rows[method]["val_mean"]  # reported on val: the chosen point's score
        assert m[f"task_merge_{method}_chosen_{key}"] in grid
        assert m[f"task_merge_{method}_normalised_mean"] == rows[method]["norm_mean"]
    assert 0.0 < m["task_merge_finetuned_accuracy_rotations"] <= 1.0
    assert "fresh classifier" in report and "| task_arithmetic | scale " in report


def test_task_merge_refuses_bad_combinations_at_validation():
    """Refused by ``validate`` (before any run exists), naming the key."""
    bad = [
        ({}, r"stages\[0\]\.tasks: give either other_data .* or tasks"),
        (
            {"other_data": {"name": "digits"}, "methods": ["linear"], "grid": {"ties": {"density": [0.1]}}},
            r"stages\[0\]\.grid: names method\(s\) \['ties'\] that are not in methods",
        ),
        ({"other_data": {"name": "digits"}, "data_seed": 0}, r"stages\[0\]\.data_seed: goes with tasks"),
        (
            {"other_data": {"name": "digits"}, "methods": ["ties"], "grid": {"ties": {"lambda": [0.5]}}},
            r"stages\[0\]\.grid: merge grid of ties: merge: unknown option\(s\) \['lambda'\]",
        ),
    ]
    for keys, message in bad:
        cfg = {
            "name": "m",
            "data": {"name": "digits"},
            "models": {"a": MLP},
            "stages": [{"stage": "task_merge", "epochs": 1, **keys}],
        }
        with pytest.raises(ConfigError, match=message):
            validate(cfg)
