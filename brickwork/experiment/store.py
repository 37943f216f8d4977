"""The run store: every run recorded in an embedded SQLite database (WAL mode).

A run is inserted as ``running`` before any work starts and updated to ``completed``,
``failed`` or ``interrupted`` when it ends, so a crash or Ctrl-C leaves a record, never a
gap. WAL lets ``brickwork runs`` read while a run is writing.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from brickwork.errors import BrickworkError, RunNotFoundError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id       TEXT PRIMARY KEY,
    name     TEXT NOT NULL,
    status   TEXT NOT NULL CHECK (status IN ('running', 'completed', 'failed', 'interrupted')),
    started  REAL NOT NULL,
    ended    REAL,
    dir      TEXT NOT NULL,
    config   TEXT NOT NULL,
    metrics  TEXT NOT NULL DEFAULT '{}',
    error    TEXT
);
CREATE INDEX IF NOT EXISTS runs_started ON runs (started);
"""


@dataclass
class RunRecord:
    """One row of the store, with JSON columns decoded."""

    id: str
    name: str
    status: str
    started: float
    ended: float | None
    dir: Path
    config: dict[str, Any]
    metrics: dict[str, Any]
    error: str | None

    @property
    def seconds(self) -> float | None:
        return None if self.ended is None else self.ended - self.started


class RunStore:
    """Runs in ``root/runs.db``; run folders live beside it in ``root/<id>/``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / "runs.db"
        try:
            with self._connect() as db:
                db.execute("PRAGMA journal_mode=WAL")
                db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as e:
            raise BrickworkError(f"{self.path}: not a readable brickwork run store ({e})") from None

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30)
        db.row_factory = sqlite3.Row
        try:
            with db:  # commits on success, rolls back on error
                yield db
        finally:
            db.close()

    def new_id(self) -> str:
        return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)

    def create(self, run_id: str, name: str, config: dict[str, Any]) -> RunRecord:
        run_dir = self.root / run_id
        with self._connect() as db:
            db.execute(
                "INSERT INTO runs (id, name, status, started, dir, config) VALUES (?, ?, 'running', ?, ?, ?)",
                (run_id, name, time.time(), str(run_dir), json.dumps(config)),
            )
        return self.get(run_id)

    def update(
        self, run_id: str, *, status: str | None = None, metrics: dict[str, Any] | None = None, error: str | None = None
    ) -> None:
        sets, vals = [], []
        if status is not None:
            sets += ["status = ?", "ended = ?"]
            vals += [status, None if status == "running" else time.time()]
        if metrics is not None:
            sets.append("metrics = ?")
            vals.append(json.dumps(metrics, default=float))
        if error is not None or status == "running":
            sets.append("error = ?")
            vals.append(error)
        with self._connect() as db:
            db.execute(f"UPDATE runs SET {', '.join(sets)} WHERE id = ?", (*vals, run_id))

    def get(self, ref: str) -> RunRecord:
        """A run by id, unique id prefix, or name (the latest run of that name)."""
        with self._connect() as db:
            rows = db.execute("SELECT * FROM runs WHERE id = ?", (ref,)).fetchall()
            if not rows:
                rows = db.execute("SELECT * FROM runs WHERE id LIKE ? ORDER BY started DESC", (ref + "%",)).fetchall()
                if len(rows) > 1:
                    ids = ", ".join(r["id"] for r in rows[:5])
                    raise RunNotFoundError(f"run {ref!r} is ambiguous: it is a prefix of {ids}")
            if not rows:
                rows = db.execute("SELECT * FROM runs WHERE name = ? ORDER BY started DESC LIMIT 1", (ref,)).fetchall()
        if not rows:
            raise RunNotFoundError(f"no run {ref!r} in {self.path}; `brickwork runs` lists them")
        return _record(rows[0])

    def list(self, limit: int = 50) -> list[RunRecord]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM runs ORDER BY started DESC LIMIT ?", (limit,)).fetchall()
        return [_record(r) for r in rows]


def _record(row: sqlite3.Row) -> RunRecord:
    return RunRecord(
        id=row["id"],
        name=row["name"],
        status=row["status"],
        started=row["started"],
        ended=row["ended"],
        dir=Path(row["dir"]),
        config=json.loads(row["config"]),
        metrics=json.loads(row["metrics"]),
        error=row["error"],
    )
