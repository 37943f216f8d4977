import os
import sqlite3
import threading

import pytest

from brickwork.errors import BrickworkError, RunNotFoundError
from brickwork.experiment.store import SCHEMA_VERSION, RunStore


def test_lifecycle_and_lookup(tmp_path):
    store = RunStore(tmp_path)
    rec = store.create("20260101-000000-abcd", "exp", {"a": 1})
    assert rec.status == "running" and rec.ended is None and rec.config == {"a": 1}
    store.update(rec.id, status="completed", metrics={"m": {"test_accuracy": 0.5}})
    got = store.get("20260101-000000")  # unique prefix
    assert got.status == "completed" and got.metrics["m"]["test_accuracy"] == 0.5 and got.seconds >= 0
    assert store.get("exp").id == rec.id  # by name
    assert [r.id for r in store.list()] == [rec.id]


def test_wal_mode(tmp_path):
    RunStore(tmp_path)
    with sqlite3.connect(tmp_path / "runs.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_unknown_and_ambiguous(tmp_path):
    store = RunStore(tmp_path)
    store.create("20260101-000000-aaaa", "x", {})
    store.create("20260101-000000-aaab", "y", {})
    with pytest.raises(RunNotFoundError, match="ambiguous"):
        store.get("20260101-000000-aaa")
    with pytest.raises(RunNotFoundError, match="no run 'zzz'"):
        store.get("zzz")


def test_status_is_constrained(tmp_path):
    store = RunStore(tmp_path)
    store.create("r", "x", {})
    with pytest.raises(sqlite3.IntegrityError):
        store.update("r", status="exploded")


def test_a_non_database_file_is_a_clear_error(tmp_path):
    (tmp_path / "runs.db").write_text("not a database, just text that is long enough" * 20)
    with pytest.raises(BrickworkError, match="not a readable brickwork run store"):
        RunStore(tmp_path)


def test_a_later_status_clears_the_error(tmp_path):
    store = RunStore(tmp_path)
    store.create("r", "x", {})
    store.update("r", status="failed", error="boom")
    store.update("r", status="completed")
    assert store.get("r").error is None


def test_run_folders_are_found_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    RunStore("runs").create("r1", "x", {})
    monkeypatch.chdir(tmp_path.parent)
    rec = RunStore(tmp_path / "runs").get("r1")
    assert rec.dir == (tmp_path / "runs" / "r1").resolve()


def _legacy_store(root):
    """A store as brickwork wrote it before the schema was versioned (user_version 0, cwd-relative dirs)."""
    root.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(root / "runs.db") as db:
        db.executescript(
            "CREATE TABLE runs (id TEXT PRIMARY KEY, name TEXT NOT NULL, status TEXT NOT NULL CHECK (status IN "
            "('running', 'completed', 'failed', 'interrupted')), started REAL NOT NULL, ended REAL, dir TEXT NOT NULL,"
            " config TEXT NOT NULL, metrics TEXT NOT NULL DEFAULT '{}', error TEXT);"
        )
        db.execute(
            "INSERT INTO runs (id, name, status, started, dir, config) VALUES ('r0', 'old', 'completed', 1, ?, '{}')",
            ("some/cwd/relative/r0",),
        )
    db.close()


def test_an_unversioned_store_is_migrated(tmp_path):
    _legacy_store(tmp_path)
    store = RunStore(tmp_path)
    with sqlite3.connect(tmp_path / "runs.db") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert store.get("r0").dir == tmp_path.resolve() / "r0"
    store.create("r1", "new", {})  # the migrated table takes the owner columns
    assert store.get("r1").owner is not None


def test_a_newer_store_is_refused(tmp_path):
    RunStore(tmp_path)
    with sqlite3.connect(tmp_path / "runs.db") as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(BrickworkError, match="newer brickwork"):
        RunStore(tmp_path)


def _make_read_only(root):
    (root / "runs.db").chmod(0o444)
    root.chmod(0o555)


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("how", ["permissions", "asked"])
def test_a_read_only_store_can_be_listed(tmp_path, legacy, how):
    if how == "permissions" and os.geteuid() == 0:
        pytest.skip("root ignores file permissions")
    root = tmp_path / "ro"
    if legacy:
        _legacy_store(root)
    else:
        RunStore(root).create("r0", "old", {})

    # SQLite's -wal/-shm companions may appear beside a WAL store a reader could write to; nothing else may.
    def files():
        return {p.name: p.stat().st_mtime_ns for p in root.iterdir() if not p.name.endswith(("-wal", "-shm"))}

    before = files()
    if how == "permissions":
        _make_read_only(root)
    try:
        store = RunStore(root) if how == "permissions" else RunStore(root, read_only=True)
        assert store.read_only
        assert [r.id for r in store.list()] == ["r0"] and store.get("r0").dir == root.resolve() / "r0"
        with pytest.raises(BrickworkError, match="read-only"):
            store.create("r1", "x", {})
        assert files() == before
        with sqlite3.connect(root / "runs.db") as db:
            assert db.execute("PRAGMA user_version").fetchone()[0] == (0 if legacy else SCHEMA_VERSION)
        db.close()
    finally:
        root.chmod(0o755)


def test_like_wildcards_in_a_reference_are_literal(tmp_path):
    store = RunStore(tmp_path)
    store.create("20260101-000000-abcd", "x", {})
    for ref in ("%", "_", "2026%", "2026010_", "\\"):
        with pytest.raises(RunNotFoundError):
            store.get(ref)


def test_a_held_store_lock_is_waited_for_then_reported(tmp_path):
    store = RunStore(tmp_path, timeout=0.05, patience=0.5)
    store.create("r", "x", {})
    holder = sqlite3.connect(tmp_path / "runs.db", isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    release = threading.Timer(0.2, holder.rollback)
    release.start()
    store.update("r", status="completed")  # retried past the SQLite timeout until the lock goes
    release.join()
    assert store.get("r").status == "completed"
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(BrickworkError, match="locked") as e:
            store.update("r", status="failed", error="x")
        assert "\n" not in str(e.value)
    finally:
        holder.rollback()
        holder.close()
