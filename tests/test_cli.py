"""The console script as a user runs it: exit codes, one-line errors, runs, resume after SIGINT."""

import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from brickwork.cli import main
from brickwork.experiment import RunStore
from brickwork.persist import load_tensors

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, cfg: dict, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda c: c["stages"][0].update(epochs="ten"), "stages[0].epochs"),
        (lambda c: c["models"]["mlp"].update(name="mlpp"), "did you mean 'mlp'"),
        (lambda c: c.update(stagse=1), "stagse: unknown key"),
        (lambda c: c["stages"][0].update(lr=0), "stages[0].lr: input should be greater than 0"),
        (lambda c: c.update(data={"name": "npz", "path": "missing.npz"}), "data.path: file not found"),
    ],
)
def test_bad_config_exits_2_with_one_line(tmp_path, tiny_config, brickwork_cli, edit, expected):
    edit(tiny_config)
    fresh = expected == "stages[0].epochs"  # one case as the console script, in its own interpreter
    cli = functools.partial(brickwork_cli, fresh_process=fresh)
    r = cli("validate", str(write(tmp_path, tiny_config)))
    assert r.returncode == 2
    assert expected in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # The same config given to `run` fails the same way before any work (no run recorded).
    r = cli("--runs-dir", str(tmp_path / "runs"), "run", str(write(tmp_path, tiny_config)))
    assert r.returncode == 2 and expected in r.stderr
    assert not (tmp_path / "runs").exists()  # the store is opened only once a run is created


def test_malformed_yaml_and_missing_file(tmp_path, brickwork_cli):
    cli = brickwork_cli
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [oops\n")
    r = cli("validate", str(bad))
    assert r.returncode == 2 and "malformed YAML" in r.stderr and "Traceback" not in r.stderr
    r = cli("validate", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2 and "not found" in r.stderr


def test_validate_and_ls(capsys, tiny_config, tmp_path):
    assert main(["validate", str(write(tmp_path, tiny_config))]) == 0
    assert "valid" in capsys.readouterr().out
    assert main(["ls", "model", "vit*"]) == 0
    out = capsys.readouterr().out
    assert "vit-tiny" in out and "dim: int (>= 1) = 64" in out and "mlp-tiny" not in out
    assert main(["ls", "stage"]) == 0
    assert "evaluate" in capsys.readouterr().out


def test_run_runs_show_report(capsys, tiny_config, tmp_path):
    runs = str(tmp_path / "runs")
    cfg = write(tmp_path, tiny_config)
    assert main(["--runs-dir", runs, "run", str(cfg), "stages[0].epochs=1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| mlp |" in out and "FLOPs/sample" in out
    assert main(["--runs-dir", runs, "run", str(cfg), "stages[0].epochs=1", "name=second", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["--runs-dir", runs, "runs"]) == 0
    out = capsys.readouterr().out
    assert "completed" in out and "second" in out and "tiny" in out
    assert main(["--runs-dir", runs, "show", "second"]) == 0
    assert "status completed" in capsys.readouterr().out
    assert main(["--runs-dir", runs, "report", "tiny"]) == 0
    assert "## Results" in capsys.readouterr().out
    assert main(["--runs-dir", runs, "report", "tiny", "second", "--out", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp" / "report.md").exists()
    before = (tmp_path / "cmp" / "report.md").read_text()
    assert main(["--runs-dir", runs, "report", "tiny", "second", "--out", str(tmp_path / "cmp")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "cmp" / "report.md").read_text() == before
    assert main(["--runs-dir", runs, "show", "nope"]) == 2
    assert "no run 'nope'" in capsys.readouterr().err


def test_sigint_is_recorded_and_resume_matches_an_uninterrupted_run(tmp_path, tiny_config, brickwork_cli):
    """The run killed by SIGINT is a console-script process; the reference and the resume run in
    this process (one torch thread in all three, so the arithmetic is the same)."""
    cli = brickwork_cli
    tiny_config["threads"] = 1
    tiny_config["stages"][0]["epochs"] = 40
    tiny_config["models"]["mlp"]["width"] = 64
    cfg = write(tmp_path, tiny_config)
    reference = cli("--runs-dir", str(tmp_path / "ref"), "run", str(cfg))
    assert reference.returncode == 0, reference.stderr

    runs = tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "brickwork", "--runs-dir", str(runs), "run", str(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.time() + 120
    while not list(runs.glob("*/mlp/stage0-train_state.json")):  # first epoch done
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    (rec,) = RunStore(runs).list()
    assert rec.status == "interrupted"
    assert "Traceback" not in err

    r = cli("--runs-dir", str(runs), "run", "--resume", rec.id)
    assert r.returncode == 0, r.stderr
    assert RunStore(runs).get(rec.id).status == "completed"
    (ref_rec,) = RunStore(tmp_path / "ref").list()
    want, _ = load_tensors(ref_rec.dir / "mlp" / "model")
    got, _ = load_tensors(rec.dir / "mlp" / "model")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_run_needs_config_or_resume(capsys):
    assert main(["run"]) == 2
    assert "give a config" in capsys.readouterr().err
