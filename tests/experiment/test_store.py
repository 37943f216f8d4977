import sqlite3

import pytest

from brickwork.errors import BrickworkError, RunNotFoundError
from brickwork.experiment.store import RunStore


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
