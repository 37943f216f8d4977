"""Run store schema 2 (sweeps): migration from schema 1 and from the unversioned schema."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from brickwork.errors import RunNotFoundError
from brickwork.experiment.store import SCHEMA_VERSION, RunStore, SweepPoint

V0 = (
    "CREATE TABLE runs (id TEXT PRIMARY KEY, name TEXT NOT NULL, status TEXT NOT NULL CHECK (status IN "
    "('running', 'completed', 'failed', 'interrupted')), started REAL NOT NULL, ended REAL, dir TEXT NOT NULL,"
    " config TEXT NOT NULL, metrics TEXT NOT NULL DEFAULT '{}', error TEXT"
)
V1 = V0 + ", pid INTEGER, host TEXT, pid_started REAL"


def _old_store(root: Path, version: int) -> None:
    """A store as brickwork wrote it at schema ``version`` (0: unversioned), holding run ``r0``."""
    root.mkdir(parents=True)
    db = sqlite3.connect(root / "runs.db")
    with db:
        db.execute((V0 if version == 0 else V1) + ")")
        db.execute(
            "INSERT INTO runs (id, name, status, started, dir, config, metrics) VALUES "
            "('r0', 'old', 'completed', 1, 'r0', '{\"a\": 1}', '{\"m\": {\"test_accuracy\": 0.5}}')"
        )
        db.execute(f"PRAGMA user_version = {version}")
    db.close()


def _version_and_columns(root: Path) -> tuple[int, set[str], set[str]]:
    db = sqlite3.connect(root / "runs.db")
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        columns = {r[1] for r in db.execute("PRAGMA table_info(runs)")}
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        db.close()
    return version, columns, tables


@pytest.mark.parametrize("version", [0, 1])
def test_an_old_store_is_migrated_to_schema_2_and_keeps_its_runs(tmp_path, version):
    assert SCHEMA_VERSION == 2
    root = tmp_path / "runs"
    _old_store(root, version)
    store = RunStore(root)
    got, columns, tables = _version_and_columns(root)
    assert got == 2 and {"sweep", "point", "point_values", "pid"} <= columns and "sweeps" in tables
    old = store.get("r0")
    assert old.point is None and old.metrics == {"m": {"test_accuracy": 0.5}} and old.dir == root.resolve() / "r0"
    sweep = store.create_sweep(
        "sweep-1", "s", [("seed", [0, 1])], [{"values": {"seed": s}, "config": {}} for s in (0, 1)]
    )
    assert sweep.dir == root.resolve() / "sweep-1" and sweep.axes == [("seed", [0, 1])]
    store.create("r1", "s", {}, point=SweepPoint("sweep-1", 1, {"seed": 1}))
    assert store.get("r1").point == SweepPoint("sweep-1", 1, {"seed": 1})
    assert {i: r.id for i, r in store.sweep_runs("sweep-1").items()} == {1: "r1"}
    assert RunStore(root).version == 2  # opening it again changes nothing


def test_a_new_store_has_the_same_schema_as_a_migrated_one(tmp_path):
    RunStore(tmp_path / "new")
    _old_store(tmp_path / "old", 1)
    RunStore(tmp_path / "old")
    assert _version_and_columns(tmp_path / "new") == _version_and_columns(tmp_path / "old")


def test_a_read_only_schema_1_store_still_opens_and_has_no_sweeps(tmp_path):
    root = tmp_path / "runs"
    _old_store(root, 1)
    store = RunStore(root, read_only=True)
    assert [r.id for r in store.list()] == ["r0"] and store.get("r0").point is None
    with pytest.raises(RunNotFoundError, match="no sweep 'sweep-x'"):
        store.get_sweep("sweep-x")
    assert _version_and_columns(root)[0] == 1  # read-only: not migrated


def test_sweep_references_are_ids_or_unique_prefixes(tmp_path):
    store = RunStore(tmp_path)
    for sid in ("sweep-20260101-000000-aaaa", "sweep-20260101-000000-aaab"):
        store.create_sweep(sid, "s", [("seed", [0])], [{"values": {"seed": 0}, "config": {}}])
    assert store.get_sweep("sweep-20260101-000000-aaab").id == "sweep-20260101-000000-aaab"
    with pytest.raises(RunNotFoundError, match="ambiguous"):
        store.get_sweep("sweep-2026")
    with pytest.raises(RunNotFoundError):
        store.get_sweep("sweep-%")
