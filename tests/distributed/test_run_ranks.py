"""`brickwork run` on several ranks: one run in the store, rank 0's files only, resume after a kill.

The ranks are forked by ``run_ranks`` with torchrun's environment and call the CLI's ``main``,
the very code a ``torchrun -m brickwork run`` rank runs; one test goes through real torchrun.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from brickwork import cli
from brickwork.distributed import RankFailed, run_ranks
from brickwork.experiment import RunStore
from brickwork.experiment.builtins import load_builtins
from brickwork.persist import load_tensors

load_builtins()  # once here, so the forked ranks start with every entry registered

CONFIG = {
    "name": "dp",
    "seed": 0,
    "data": {"name": "digits"},
    "models": {"mlp": {"name": "mlp", "width": 16, "depth": 1}},
    "stages": [{"stage": "train", "epochs": 2, "batch_size": 256, "lr": 0.01}],
}


def _config(tmp_path: Path, **train: object) -> str:
    cfg = {**CONFIG, "stages": [{**CONFIG["stages"][0], **train}]}
    path = tmp_path / "dp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_tensors(run_dir / "mlp" / "model")[0]


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory, cli_ranks: SimpleNamespace) -> tuple[Path, str]:
    """An uninterrupted 2-rank run of 3 epochs: its store and its config file."""
    tmp = tmp_path_factory.mktemp("whole")
    cfg, runs = _config(tmp, epochs=3), tmp / "runs"
    assert run_ranks(cli_ranks.main, 2, ["--runs-dir", str(runs), "run", cfg, "--no-progress"]) == [0, 0]
    return runs, cfg


def test_two_ranks_make_one_run_written_by_rank_0(whole, tmp_path):
    runs, cfg = whole
    (record,) = RunStore(runs).list()
    assert record.status == "completed" and record.metrics["mlp"]["train_seconds"] > 0
    assert sorted(p.name for p in runs.iterdir()) == [record.id, "runs.db"]  # no rank-1 leftovers
    assert cli.main(["--runs-dir", str(tmp_path / "one"), "run", cfg, "--no-progress"]) == 0
    (single,) = RunStore(tmp_path / "one").list()
    got, want = _weights(record.dir), _weights(single.dir)
    assert max((got[k] - want[k]).abs().max().item() for k in want) < 1e-6  # float32, 3 x 5 steps


@pytest.mark.parametrize("world_after", [2, 1])
def test_a_killed_rank_fails_the_run_and_resume_gives_the_uninterrupted_weights(
    whole, tmp_path, monkeypatch, world_after, cli_ranks
):
    monkeypatch.setenv("BRICKWORK_DIST_TIMEOUT", "30")  # bounds the wait should gloo not see the death
    done, cfg = whole
    runs = tmp_path / "runs"
    with pytest.raises(RankFailed, match=r"ranks \[1\] exited with \[-9\]"):  # rank 0 ended cleanly
        run_ranks(cli_ranks.die_after_first_save, 2, ["--runs-dir", str(runs), "run", cfg, "--no-progress"])
    (record,) = RunStore(runs).list()
    assert record.status in {"failed", "stale"}, record.status  # never left looking alive
    argv = ["--runs-dir", str(runs), "run", "--resume", record.id, "--no-progress"]
    if world_after == 1:
        assert cli.main(argv) == 0
    else:
        assert run_ranks(cli_ranks.main, 2, argv) == [0, 0]
    assert RunStore(runs).get(record.id).status == "completed"
    got, want = _weights(record.dir), _weights(RunStore(done).list()[0].dir)
    tol = 0.0 if world_after == 2 else 1e-6  # same world size: the same sums, bit for bit
    assert max((got[k] - want[k]).abs().max().item() for k in want) <= tol


def test_a_missing_rendezvous_is_one_message_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for v in ("LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(v, raising=False)
    assert cli.main(["--runs-dir", str(tmp_path / "runs"), "run", _config(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rendezvous variables LOCAL_RANK, MASTER_ADDR, MASTER_PORT are not set" in err[0]
    assert not (tmp_path / "runs").exists()


def test_other_ranks_stay_quiet_on_a_bad_config(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**CONFIG, "stages": [{"stage": "train", "data_parallel": "zero3"}]}))
    assert cli.main(["--runs-dir", str(tmp_path / "runs"), "run", str(bad)]) == 2
    assert capsys.readouterr().err == ""


def test_torchrun_runs_a_shipped_config_end_to_end(tmp_path):
    runs = tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cfg = _config(tmp_path, epochs=1)
    cmd = [sys.executable, "-m", "brickwork", "--runs-dir", str(runs), "run", "--nproc", "2", cfg]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (record,) = RunStore(runs).list()
    assert record.status == "completed"
