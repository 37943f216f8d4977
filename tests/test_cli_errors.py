"""Failures a user meets outside a config's keys: each is one line, exit 2 (130 for Ctrl-C), no traceback.

Non-UTF-8 configs, a full or read-only disk (ENOSPC / EROFS / EACCES from Python, safetensors or
SQLite), ``report --out`` naming a file, output piped into ``head``, Ctrl-C during start-up, and
metrics that are not JSON values.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from brickwork import cli
from brickwork.experiment import RunStore
from brickwork.persist import read_json, save_tensors, write_json
from brickwork.textio import JSONValueError, dumps, to_json

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def one_line(r: Any, code: int = 2) -> str:
    """The one line of stderr of a refusal with status ``code`` (a CLI result or a finished process)."""
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


# --- configs that are not UTF-8 text -------------------------------------------------------------


@pytest.mark.parametrize(
    "encode, expected",
    [
        (lambda text: text.encode("utf-16"), "UTF-16"),
        (lambda text: text.encode("utf-16-be"), "not a text file"),  # no BOM: NUL bytes
        (lambda text: b"\x89PNG\r\n\x1a\n" + os.urandom(64), "not"),
        (lambda text: text.encode("latin-1") + b"# caf\xe9\n", "not UTF-8 text (byte 0xe9"),
    ],
)
def test_config_not_utf8_is_one_line_and_records_nothing(tmp_path, tiny_config, brickwork_cli, encode, expected):
    path = tmp_path / "c.yaml"
    path.write_bytes(encode(yaml.safe_dump(tiny_config)))
    fresh = expected == "UTF-16"  # one case as the console script, in its own interpreter
    for verb in (["validate"], ["--runs-dir", str(tmp_path / "runs"), "run"]):
        line = one_line(brickwork_cli(*verb, str(path), fresh_process=fresh))
        assert str(path) in line and expected in line
    assert not (tmp_path / "runs" / "runs.db").exists() or not RunStore(tmp_path / "runs").list()


def test_config_with_utf8_bom_still_reads(tmp_path, tiny_config, brickwork_cli):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + yaml.safe_dump(tiny_config).encode())
    r = brickwork_cli("validate", str(path))
    assert r.returncode == 0, r.stderr


# --- OSError and SQLite errors from the environment, injected ------------------------------------


@pytest.mark.parametrize(
    "error, expected",
    [
        (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/runs/x/model.safetensors"), "no space left"),
        (OSError(errno.EROFS, os.strerror(errno.EROFS), "/runs/x"), "read-only"),
        (PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/runs/x"), "permission denied"),
        (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "no space left"),  # no file name (a write on an fd)
        (sqlite3.OperationalError("database or disk is full"), "no space left"),
        (sqlite3.OperationalError("attempt to write a readonly database"), "read-only"),
    ],
)
def test_environment_errors_map_to_one_line(monkeypatch, capsys, error, expected):
    def fail(args: object) -> int:
        raise error

    monkeypatch.setattr(cli, "_dispatch", fail)
    assert cli.main(["runs"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("brickwork runs: error: ")
    assert expected in err.lower()


def test_a_bug_still_has_its_traceback(monkeypatch):
    """Only errors of the environment are mapped; an OSError brickwork did not expect stays a bug."""

    def fail(args: object) -> int:
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(cli, "_dispatch", fail)
    with pytest.raises(OSError):
        cli.main(["runs"])


def test_safetensors_enospc_is_an_oserror(monkeypatch, tmp_path):
    """safetensors reports a full disk as its own error type; it reaches the CLI as ENOSPC."""
    from safetensors import SafetensorError

    import brickwork.persist as persist

    def full(tensors: object, filename: str) -> None:
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(persist, "save_file", full)
    with pytest.raises(OSError) as info:
        save_tensors(tmp_path / "m", {"w": torch.zeros(2)})
    assert info.value.errno == errno.ENOSPC and str(tmp_path / "m.safetensors") in str(info.value)
    assert list(tmp_path.iterdir()) == []  # the temporary file is gone


@contextmanager
def mounted_tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    except FileNotFoundError:
        pytest.skip("no mount command here")
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_full_disk_fails_the_run_with_one_line(tmp_path, tiny_config, brickwork_cli):
    """A real full disk: a 1 MiB tmpfs, a model whose training state is ~4 MB."""
    tiny_config["models"]["mlp"].update(width=512)
    tiny_config["stages"][0].update(epochs=1)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config))
    with mounted_tmpfs(tmp_path / "disk", "1m") as disk:
        line = one_line(brickwork_cli("--runs-dir", str(disk / "runs"), "run", str(cfg)))
        assert "no space left" in line.lower()
        (run,) = RunStore(disk / "runs").list()
        assert run.status == "failed" and "No space left" in (run.error or "")
        assert not [p for p in (disk / "runs").rglob("*.tmp")]  # no half-written files left behind


@contextmanager
def read_only(folder: Path) -> Iterator[Path]:
    """``folder`` remounted read-only in place (a bind mount: works as root, where chmod does not)."""
    r = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot bind-mount here (needs root): {r.stderr.decode().strip()}")
    try:
        r = subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot remount read-only here: {r.stderr.decode().strip()}")
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _finished_run(tmp_path: Path, cfg: dict, cli_run: Callable[..., Any]) -> tuple[Path, str]:
    """A completed one-epoch run of ``cfg``: the store's folder and the run's id."""
    runs = tmp_path / "runs"
    cfg["stages"][0].update(epochs=1)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = cli_run("--runs-dir", str(runs), "run", str(path))
    assert r.returncode == 0, r.stderr
    (run,) = RunStore(runs).list()
    return runs, run.id


def test_resume_in_a_read_only_run_folder(tmp_path, tiny_config, brickwork_cli):
    runs, run_id = _finished_run(tmp_path, tiny_config, brickwork_cli)
    progress = next((runs / run_id).rglob("progress.json"))
    write_json(progress, {**read_json(progress), "done": 1})  # as if killed before its last stage
    with sqlite3.connect(runs / "runs.db") as db:
        db.execute("UPDATE runs SET status = 'failed' WHERE id = ?", (run_id,))
    before = {p: p.read_bytes() for p in (runs / run_id).rglob("*") if p.is_file()}
    with read_only(runs / run_id):
        line = one_line(brickwork_cli("--runs-dir", str(runs), "run", "--resume", run_id))
    assert "read-only" in line.lower() and str(runs / run_id) in line
    assert RunStore(runs).get(run_id).status == "failed"  # the resume never started: the run is as it was
    assert {p: p.read_bytes() for p in (runs / run_id).rglob("*") if p.is_file()} == before


def test_slice_into_a_read_only_folder(tmp_path, tiny_config, brickwork_cli):
    tiny_config["models"]["mlp"] = {"name": "nested_mlp", "width": 24, "depth": 3, "depths": [2, 3]}
    runs, run_id = _finished_run(tmp_path, tiny_config, brickwork_cli)
    out = tmp_path / "out"
    out.mkdir()
    with read_only(out):
        r = brickwork_cli("--runs-dir", str(runs), "slice", run_id, "--width", "0.5", "--out", str(out / "small"))
    if r.returncode == 2 and "read-only" not in r.stderr.lower():
        pytest.skip(f"slice refused this run for another reason: {r.stderr.strip()}")
    assert "read-only" in one_line(r).lower()
    assert list(out.iterdir()) == []


# --- report --out FILE ---------------------------------------------------------------------------


def test_report_out_an_existing_file_is_refused_untouched(tmp_path, tiny_config, brickwork_cli):
    runs, _ = _finished_run(tmp_path, tiny_config, brickwork_cli)
    assert brickwork_cli("--runs-dir", str(runs), "run", str(tmp_path / "c.yaml")).returncode == 0
    ids = [r.id for r in RunStore(runs).list()]
    target = tmp_path / "notes.md"
    target.write_text("my notes\n")
    line = one_line(brickwork_cli("--runs-dir", str(runs), "report", *ids, "--out", str(target)))
    assert str(target) in line and "not a folder" in line
    assert target.read_text() == "my notes\n"
    line = one_line(brickwork_cli("--runs-dir", str(runs), "report", *ids, "--out", str(target / "sub")))
    assert target.read_text() == "my notes\n"


def test_report_default_folder_name_stays_short(tmp_path):
    from brickwork.experiment.report import compare_dir_name

    ids = [f"20261201-0954{i:02d}-abcd" for i in range(40)]
    name = compare_dir_name(ids)
    assert name.startswith("compare-") and len(name) < 100
    assert compare_dir_name(ids) == name and compare_dir_name(ids[:2]) == "compare-" + "-".join(ids[:2])


# --- a closed pipe, Ctrl-C during start-up -------------------------------------------------------


def test_output_into_a_closed_pipe_exits_quietly():
    """``brickwork ls | head -1``: the reader is gone before brickwork writes."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "brickwork", "ls"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the interpreter has even started: every write meets EPIPE
    err = proc.stderr.read().decode()
    proc.wait(timeout=300)
    assert err == "" and proc.returncode == 141


def test_shell_pipe_into_head(tmp_path):
    if shutil.which("head") is None or shutil.which("sh") is None:
        pytest.skip("no sh/head")
    cmd = f"{sys.executable} -m brickwork ls | head -1; exit 0"
    r = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, env=ENV, timeout=300)
    assert r.stderr == "" and len(r.stdout.splitlines()) == 1


@pytest.mark.parametrize("where", ["brickwork.experiment.builtins.load_builtins", "brickwork.cli._parser"])
def test_ctrl_c_during_start_up(where):
    module, name = where.rsplit(".", 1)
    code = (
        f"import importlib, sys; m = importlib.import_module({module!r})\n"
        "def interrupted(*a, **k): raise KeyboardInterrupt\n"
        f"setattr(m, {name!r}, interrupted)\n"
        "from brickwork.cli import entrypoint; sys.argv = ['brickwork', 'runs']; entrypoint()"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
    assert "interrupted" in one_line(r, code=130)


# --- metrics that are not JSON values ------------------------------------------------------------


def test_to_json_converts_numbers_and_refuses_the_rest():
    row = {"acc": torch.tensor(0.5), "n": np.int64(3), "f": np.float32(0.25), "loss": float("nan"), "t": (1, 2)}
    assert to_json({"mlp": row}) == {"mlp": {"acc": 0.5, "n": 3, "f": 0.25, "loss": None, "t": [1, 2]}}
    assert json.loads(dumps({"x": [math.inf, -math.inf, np.array([1.5])]})) == {"x": [None, None, 1.5]}
    with pytest.raises(JSONValueError, match=r"mlp\.curve: a Tensor of shape \(3,\)"):
        to_json({"mlp": {"curve": torch.zeros(3)}})
    with pytest.raises(JSONValueError, match=r"mlp\.model: a Linear has no JSON form"):
        to_json({"mlp": {"model": torch.nn.Linear(1, 1)}})


def test_metrics_files_and_store_are_strict_json(tmp_path, brickwork_cli):
    write_json(tmp_path / "metrics.json", {"mlp": {"test_loss": float("nan"), "acc": torch.tensor(0.75)}})
    text = (tmp_path / "metrics.json").read_text()
    assert json.loads(text, parse_constant=pytest.fail) == {"mlp": {"acc": 0.75, "test_loss": None}}
    with pytest.raises(JSONValueError):
        write_json(tmp_path / "bad.json", {"mlp": {"w": torch.zeros(2, 2)}})
    assert not (tmp_path / "bad.json").exists()
    store = RunStore(tmp_path / "runs")
    run = store.create(store.new_id(), "x", {})
    store.update(run.id, status="completed", metrics={"mlp": {"test_accuracy": np.float64(0.5), "l": math.inf}})
    with sqlite3.connect(tmp_path / "runs" / "runs.db") as db:
        (cell,) = db.execute("SELECT metrics FROM runs").fetchone()
    assert json.loads(cell, parse_constant=pytest.fail) == {"mlp": {"test_accuracy": 0.5, "l": None}}
    r = brickwork_cli("--runs-dir", str(tmp_path / "runs"), "runs")  # a null metric still lists
    assert r.returncode == 0 and "acc 0.500" in r.stdout, r.stderr
