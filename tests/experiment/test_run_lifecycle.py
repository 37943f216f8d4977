"""A run's life as processes see it: owners, locks, kills, interrupts, leftovers, other directories."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import brickwork.experiment.pipeline as pipeline
from brickwork.experiment import RunStore, execute, validate
from brickwork.persist import load_tensors, owned_folder, save_tensors

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def start(cfg: Path, runs: str, cwd: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "brickwork", "--runs-dir", runs, "run", str(cfg), "--no-progress"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=ENV)


def wait_for_first_epoch(proc: subprocess.Popen, runs: Path) -> Path:
    deadline = time.time() + 120
    while not (found := list(runs.glob("*/mlp/stage0-train_state.json"))):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    return found[0].parents[1]


def write(tmp_path: Path, cfg: dict[str, Any]) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_killed_run_is_stale_and_resumes_in_its_folder_from_another_directory(tmp_path, tiny_config, brickwork_cli):
    """The killed run is a console-script process; the reference, the listing and the resume run in
    this process (one torch thread in each, so the arithmetic is the same)."""
    cli = brickwork_cli
    tiny_config["threads"] = 1
    tiny_config["stages"][0]["epochs"] = 30
    cfg = write(tmp_path, tiny_config)
    reference = cli("--runs-dir", str(tmp_path / "ref"), "run", str(cfg), "--no-progress")
    assert reference.returncode == 0, reference.stderr

    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    proc = start(cfg, "runs", cwd=here)  # a store named relative to the working directory
    run_dir = wait_for_first_epoch(proc, here / "runs")
    proc.kill()
    proc.wait()
    # What a save killed half-way leaves behind, and a file of the user's that must stay.
    vdir = run_dir / "mlp"
    orphans = [vdir / ".model.safetensors.k1ll3d00.tmp", vdir / "model.safetensors.pending", run_dir / ".x.y.tmp"]
    for o in orphans:
        o.write_bytes(b"half a checkpoint")
    (run_dir / "notes.txt").write_text("mine")

    listed = cli("--runs-dir", str(here / "runs"), "runs", cwd=elsewhere)
    assert listed.returncode == 0 and " stale " in listed.stdout, listed.stdout
    (rec,) = RunStore(here / "runs").list()
    assert rec.status == "stale" and rec.owner is not None and rec.owner.pid == proc.pid

    r = cli("--runs-dir", str(here / "runs"), "run", "--resume", rec.id, "--no-progress", cwd=elsewhere)
    assert r.returncode == 0, r.stderr
    assert not (elsewhere / "runs").exists()  # nothing written where the command happened to run
    done = RunStore(here / "runs").get(rec.id)
    assert done.status == "completed" and done.error is None and done.dir == run_dir.resolve()
    assert not any(o.exists() for o in orphans) and (run_dir / "notes.txt").read_text() == "mine"
    (ref_rec,) = RunStore(tmp_path / "ref").list()
    want, _ = load_tensors(ref_rec.dir / "mlp" / "model")
    got, _ = load_tensors(done.dir / "mlp" / "model")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_resume_of_a_live_run_is_refused(tmp_path, tiny_config, brickwork_cli):
    cli = brickwork_cli
    tiny_config["stages"][0]["epochs"] = 100_000  # runs until it is killed
    runs = tmp_path / "runs"
    proc = start(write(tmp_path, tiny_config), str(runs), cwd=tmp_path)
    try:
        run_dir = wait_for_first_epoch(proc, runs)
        (rec,) = RunStore(runs).list()
        assert rec.status == "running"
        r = cli("--runs-dir", str(runs), "run", "--resume", rec.id)
        assert r.returncode == 2 and "still running" in r.stderr and f"pid {proc.pid}" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
        assert proc.poll() is None  # the live run goes on, untouched
    finally:
        proc.kill()
        proc.wait()
    assert RunStore(runs).get(rec.id).status == "stale" and run_dir.is_dir()


def test_a_second_interrupt_while_the_first_is_recorded_still_leaves_a_final_state(tiny_config, runs_dir, monkeypatch):
    def first_interrupt(*args: object, **kwargs: object) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # the handler raises KeyboardInterrupt here
        raise AssertionError("SIGINT was not delivered")

    real_update = RunStore.update

    def update_interrupted_again(self: RunStore, run_id: str, **kw: Any) -> None:
        if kw.get("status") == "interrupted":
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C again, inside the recording of the first
        real_update(self, run_id, **kw)

    monkeypatch.setattr(pipeline, "_run_variant", first_interrupt)
    monkeypatch.setattr(RunStore, "update", update_interrupted_again)
    with pytest.raises(KeyboardInterrupt):
        execute(validate(tiny_config), RunStore(runs_dir), progress=False, echo=lambda s: None)
    (rec,) = RunStore(runs_dir).list()
    assert rec.status == "interrupted"


def _orphans(stem: Path) -> list[Path]:
    return [
        stem.with_name(f".{stem.name}.safetensors.a1b2c3d4.tmp"),
        stem.with_name(f".{stem.name}.json.e5f6a7b8.tmp"),
        stem.with_name(f"{stem.name}.safetensors.pending"),
    ]


def test_a_save_cleans_leftovers_of_its_stem_only_in_an_owned_folder(tmp_path):
    tensors = {"w": torch.arange(4.0)}
    for owned in (False, True):
        folder = tmp_path / str(owned)
        stem = folder / "model"
        folder.mkdir()
        save_tensors(stem, tensors)
        leftovers = _orphans(stem)
        for p in leftovers:
            p.write_bytes(b"cut off")
        other = folder / ".other.json.00000000.tmp"  # another stem's save: not ours to judge
        other.write_bytes(b"x")
        if owned:
            with owned_folder(folder):
                save_tensors(stem, tensors)
        else:
            save_tensors(stem, tensors)
        # Temporary files of a killed save go only where this process owns the folder; a stale
        # pending file is always replaced by the save's own (which then becomes the checkpoint).
        assert [p.exists() for p in leftovers] == [not owned, not owned, False]
        assert other.exists()
        assert torch.equal(load_tensors(stem)[0]["w"], tensors["w"])


def test_a_committed_pending_file_is_rolled_forward_not_deleted(tmp_path):
    stem = tmp_path / "model"
    save_tensors(stem, {"w": torch.zeros(3)})
    save_tensors(tmp_path / "next", {"w": torch.ones(3)})
    # A save killed after its commit point: the JSON names the new tensors, still pending.
    os.replace(tmp_path / "next.safetensors", tmp_path / "model.safetensors.pending")
    os.replace(tmp_path / "next.json", tmp_path / "model.json")
    with owned_folder(tmp_path):
        save_tensors(tmp_path / "model", {"w": torch.full((3,), 2.0)})
    assert torch.equal(load_tensors(stem)[0]["w"], torch.full((3,), 2.0))
    assert not (tmp_path / "model.safetensors.pending").exists()


def test_a_finished_run_is_recorded_though_the_store_is_locked_past_its_timeout(tiny_config, runs_dir, monkeypatch):
    import sqlite3
    import threading

    tiny_config["stages"][0]["epochs"] = 1
    store = RunStore(runs_dir, timeout=0.05, patience=30)
    real_update = RunStore.update
    holder = sqlite3.connect(store.path, isolation_level=None, check_same_thread=False)

    def update_while_locked(self: RunStore, run_id: str, **kw: Any) -> None:
        if kw.get("status") == "completed":
            holder.execute("BEGIN EXCLUSIVE")  # another process's long transaction
            threading.Timer(0.5, holder.rollback).start()  # ten times SQLite's own timeout
        real_update(self, run_id, **kw)

    monkeypatch.setattr(RunStore, "update", update_while_locked)
    rec = execute(validate(tiny_config), store, progress=False, echo=lambda s: None)
    holder.close()
    assert rec.status == "completed" and RunStore(runs_dir).get(rec.id).status == "completed"
