"""`brickwork run` with ``expert_parallel: 2``: validated before work, killed, resumed at any degree.

The ranks are forked by ``run_ranks`` with torchrun's environment and call the CLI's ``main``
(``conftest.cli_ranks``), as ``tests/distributed/test_run_ranks.py`` does for plain data parallelism.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from brickwork import cli
from brickwork.distributed import RankFailed, run_ranks
from brickwork.experiment import RunStore
from brickwork.experiment.builtins import load_builtins
from brickwork.persist import load_tensors

load_builtins()  # once here, so the forked ranks start with every entry registered

MODEL = {"name": "moe_mlp", "width": 16, "depth": 1, "hidden": 16, "num_experts": 4, "top_k": 2}
CONFIG = {
    "name": "ep",
    "seed": 0,
    "data": {"name": "digits"},
    "models": {"moe": MODEL},
    "stages": [{"stage": "train", "epochs": 2, "batch_size": 256, "lr": 0.01, "expert_parallel": 2}],
}


def _config(tmp_path: Path, model: dict | None = None, **train: object) -> str:
    cfg = {**CONFIG, "models": {"moe": model or MODEL}, "stages": [{**CONFIG["stages"][0], **train}]}
    path = tmp_path / "ep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_tensors(run_dir / "moe" / "model")[0]


def test_a_killed_ep_run_resumes_bit_for_bit_on_2_ranks_and_within_1e6_in_one_process(tmp_path, monkeypatch, cli_ranks):
    monkeypatch.setenv("BRICKWORK_DIST_TIMEOUT", "30")
    cfg = _config(tmp_path)
    whole = tmp_path / "whole"
    assert run_ranks(cli_ranks.main, 2, ["--runs-dir", str(whole), "run", cfg, "--no-progress"]) == [0, 0]
    (done,) = RunStore(whole).list()
    assert done.status == "completed"
    want = _weights(done.dir)
    runs = tmp_path / "runs"
    with pytest.raises(RankFailed, match=r"ranks \[1\] exited with \[-9\]"):
        run_ranks(cli_ranks.die_after_first_save, 2, ["--runs-dir", str(runs), "run", cfg, "--no-progress"])
    (record,) = RunStore(runs).list()
    assert record.status in {"failed", "stale"}, record.status
    # the checkpoint is the single-process one: every expert, gathered over the EP group
    state = load_tensors(record.dir / "moe" / "stage0-train_state")[0]
    assert state["model.body.layers.0.ffn.experts.w_in"].shape[0] == 4
    single = tmp_path / "single"
    shutil.copytree(runs, single)  # the same killed state, to resume in one process (no expert parallelism)
    argv = ["run", "--resume", record.id, "--no-progress"]
    assert run_ranks(cli_ranks.main, 2, ["--runs-dir", str(runs), *argv]) == [0, 0]
    got = _weights(RunStore(runs).get(record.id).dir)
    assert max((got[k] - want[k]).abs().max().item() for k in want) == 0.0  # same degree: bit for bit
    assert cli.main(["--runs-dir", str(single), *argv]) == 0
    got = _weights(RunStore(single).get(record.id).dir)
    assert max((got[k] - want[k]).abs().max().item() for k in want) <= 1e-6  # float32 round-off


@pytest.mark.parametrize(
    ("model", "train", "message"),
    [
        (
            {**MODEL, "num_experts": 6},
            {"expert_parallel": 4},
            "6 experts cannot be split evenly over an expert-parallel group of 4",
        ),
        ({"name": "mlp", "width": 8, "depth": 1}, {}, "has no MoE layer whose experts could be sharded"),
        ({**MODEL, "router": "expert_choice"}, {}, "router expert_choice picks each expert's top tokens"),
    ],
)
def test_validate_refuses_an_unshardable_ep_config_in_one_line(tmp_path, capsys, model, train, message):
    assert cli.main(["validate", _config(tmp_path, model, **train)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "stages[0].expert_parallel" in err[0], err


def test_a_degree_that_does_not_divide_the_world_is_refused_before_the_run(tmp_path, cli_ranks):
    cfg = _config(tmp_path, {**MODEL, "num_experts": 6}, expert_parallel=3)
    out = run_ranks(cli_ranks.main, 2, ["--runs-dir", str(tmp_path / "runs"), "run", cfg, "--no-progress"])
    assert out == [2, 2] and not (tmp_path / "runs").exists()
