"""The run store: every run recorded in an embedded SQLite database (WAL mode).

A run is inserted as ``running`` before any work starts and updated to ``completed``,
``failed`` or ``interrupted`` when it ends, so a crash or Ctrl-C leaves a record, never a
gap. WAL lets ``brickwork runs`` read while a run is writing.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from brickwork.errors import BrickworkError, RunNotFoundError
from brickwork.experiment.owner import Owner, lock_held
from brickwork.textio import dumps

T = TypeVar("T")

# The schema's version, in ``PRAGMA user_version``. 0 is the unversioned schema of earlier
# releases (no owner columns, run folders relative to the working directory of the run); 1 added
# the owner columns; 2 added sweeps (the ``sweeps`` table, and the point a run is of).
SCHEMA_VERSION = 2

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
    error    TEXT,
    pid      INTEGER,
    host     TEXT,
    pid_started REAL,
    sweep    TEXT,
    point    INTEGER,
    point_values TEXT
);
CREATE INDEX IF NOT EXISTS runs_started ON runs (started);
"""

_OWNER_COLUMNS = ("pid INTEGER", "host TEXT", "pid_started REAL")

# Schema 2. A sweep is planned whole before any point runs: ``points`` holds every point's values
# and resolved config (JSON), so a resume knows the points that never started. A point that
# started is a run whose ``sweep`` and ``point`` (0-based index into ``points``) name it.
_SWEEP_SCHEMA = """
CREATE TABLE IF NOT EXISTS sweeps (
    id      TEXT PRIMARY KEY,
    name    TEXT NOT NULL,
    started REAL NOT NULL,
    axes    TEXT NOT NULL,
    points  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_sweep ON runs (sweep, point);
"""

_SWEEP_COLUMNS = ("sweep TEXT", "point INTEGER", "point_values TEXT")

#: Sweep ids start with this, so a reference names a sweep or a run unambiguously.
SWEEP_PREFIX = "sweep-"


@dataclass(frozen=True)
class SweepPoint:
    """Which point of which sweep a run is: the sweep's id, the point's index, its swept values."""

    sweep: str
    index: int
    values: dict[str, Any]


@dataclass
class SweepRecord:
    """One row of the ``sweeps`` table, decoded.

    ``axes`` are ``[key, [values...]]`` pairs in the order they vary (the first slowest);
    ``points`` are ``{"values": {key: value}, "config": resolved config}``, one per grid point.
    """

    id: str
    name: str
    started: float
    dir: Path
    axes: list[tuple[str, list[Any]]]
    points: list[dict[str, Any]]


@dataclass
class RunRecord:
    """One row of the store, with JSON columns decoded.

    ``status`` is ``stale`` (never stored) for a run recorded as ``running`` whose owning
    process is gone: killed, or its machine rebooted. It can be resumed.
    """

    id: str
    name: str
    status: str
    started: float
    ended: float | None
    dir: Path
    config: dict[str, Any]
    metrics: dict[str, Any]
    error: str | None
    owner: Owner | None = None
    point: SweepPoint | None = None

    @property
    def seconds(self) -> float | None:
        return None if self.ended is None else self.ended - self.started


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK)


class RunStore:
    """Runs in ``root/runs.db``; run folders live beside it in ``root/<id>/``.

    Args:
        root: the store's folder (created when missing and writable).
        read_only: open without writing anything; by default when the folder or the database
            file is not writable, so a store on a read-only mount can still be listed.
        timeout: SQLite's own wait for a lock, per attempt (seconds).
        patience: how long a locked store is retried, with backoff, before it is reported.
    """

    def __init__(
        self, root: str | Path, *, read_only: bool | None = None, timeout: float = 30, patience: float = 120
    ) -> None:
        # Absolute, so a run's folder is the same whichever directory a later command runs in.
        self.root = Path(root).resolve()
        self.path = self.root / "runs.db"
        self.timeout, self.patience = timeout, patience
        if read_only is None:
            parent = self.root if self.root.exists() else next(p for p in self.root.parents if p.exists())
            read_only = not _writable(parent) or (self.path.exists() and not _writable(self.path))
        self.read_only = read_only
        if not read_only:
            self.root.mkdir(parents=True, exist_ok=True)
        try:
            self.version = self._retry(self._open)
        except sqlite3.DatabaseError as e:
            raise BrickworkError(f"{self.path}: not a readable brickwork run store ({e})") from None

    def _open(self) -> int:
        """Check the schema's version; create or migrate it unless the store is read-only."""
        if self.read_only and not self.path.exists():
            return SCHEMA_VERSION  # nothing recorded yet, and nothing may be written
        with self._connect() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise BrickworkError(
                    f"{self.path}: run store schema version {version} was written by a newer brickwork "
                    f"(this one reads up to {SCHEMA_VERSION}); upgrade brickwork to use it"
                )
            if self.read_only or version == SCHEMA_VERSION:
                return int(version)
            db.execute("PRAGMA journal_mode=WAL")
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")  # one process migrates; the others wait, then see the current version
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                _migrate_0_to_1(db, self.root)
            if version <= 1:
                _migrate_1_to_2(db)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        return SCHEMA_VERSION

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        if self.read_only:
            # mode=ro never writes; immutable=1 is needed to read a WAL store whose folder is read-only
            # (no -shm file can be made there), and is safe because no one can be writing it.
            uri = f"{self.path.as_uri()}?mode=ro" + ("&immutable=1" if not _writable(self.root) else "")
            db = sqlite3.connect(uri, uri=True, timeout=self.timeout)
        else:
            db = sqlite3.connect(self.path, timeout=self.timeout)
        db.row_factory = sqlite3.Row
        try:
            with db:  # commits on success, rolls back on error
                yield db
        finally:
            db.close()

    def _retry(self, op: Callable[[], T]) -> T:
        """Run ``op``, retrying with backoff while another process holds the store's lock.

        A lock held past SQLite's own timeout (a long transaction elsewhere, a stuck process
        on a network file system) is waited out up to ``patience`` seconds, then reported.
        """
        deadline, pause = time.monotonic() + self.patience, 0.05
        while True:
            try:
                return op()
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e):
                    raise
                if time.monotonic() + pause > deadline:
                    raise BrickworkError(
                        f"{self.path}: the run store is locked by another process ({e}); "
                        f"gave up after {self.patience:g} s of retries"
                    ) from None
                time.sleep(pause)
                pause = min(pause * 2, 2.0)

    def _write(self, sql: str, params: tuple[Any, ...]) -> None:
        if self.read_only:
            raise BrickworkError(f"{self.path}: the run store is read-only; nothing can be recorded in it")

        def op() -> None:
            with self._connect() as db:
                db.execute(sql, params)

        self._retry(op)

    def _rows(self, sql: str, params: tuple[Any, ...]) -> list[sqlite3.Row]:
        if self.read_only and not self.path.exists():
            return []

        def op() -> list[sqlite3.Row]:
            with self._connect() as db:
                return db.execute(sql, params).fetchall()

        try:
            return self._retry(op)
        except sqlite3.OperationalError as e:
            if "no such table" in str(e):
                return []  # an empty read-only store
            raise

    def new_id(self) -> str:
        return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)

    def create(self, run_id: str, name: str, config: dict[str, Any], *, point: SweepPoint | None = None) -> RunRecord:
        """Record a new run as ``running``, owned by this process; its folder is ``root/run_id``.

        ``point``: the sweep point this run is (its sweep must be recorded already).
        """
        me = Owner.current()
        where = (None, None, None) if point is None else (point.sweep, point.index, dumps(point.values, "point"))
        self._write(
            "INSERT INTO runs (id, name, status, started, dir, config, pid, host, pid_started, sweep, point,"
            " point_values) VALUES (?, ?, 'running', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (run_id, name, time.time(), run_id, dumps(config, "config"), me.pid, me.host, me.started, *where),
        )
        return self.get(run_id)

    def new_sweep_id(self) -> str:
        return SWEEP_PREFIX + self.new_id()

    def create_sweep(
        self, sweep_id: str, name: str, axes: list[tuple[str, list[Any]]], points: list[dict[str, Any]]
    ) -> SweepRecord:
        """Record a planned sweep: its axes and every point (values and resolved config)."""
        self._write(
            "INSERT INTO sweeps (id, name, started, axes, points) VALUES (?, ?, ?, ?, ?)",
            (sweep_id, name, time.time(), dumps([list(a) for a in axes], "axes"), dumps(points, "points")),
        )
        return self.get_sweep(sweep_id)

    def get_sweep(self, ref: str) -> SweepRecord:
        """A sweep by id or unique id prefix (``sweep-2026...``)."""
        rows = self._by_id("sweeps", ref, "sweep")
        if not rows:
            raise RunNotFoundError(f"no sweep {ref!r} in {self.path}; `brickwork runs` lists sweeps beside their runs")
        row = rows[0]
        return SweepRecord(
            id=row["id"],
            name=row["name"],
            started=row["started"],
            dir=self.root / row["id"],
            axes=[(k, v) for k, v in json.loads(row["axes"])],
            points=json.loads(row["points"]),
        )

    def sweep_runs(self, sweep_id: str) -> dict[int, RunRecord]:
        """The run of each started point of a sweep, by point index (the latest, were there two)."""
        rows = self._rows("SELECT * FROM runs WHERE sweep = ? ORDER BY started", (sweep_id,))
        return {int(r["point"]): self._record(r) for r in rows}

    def adopt(self, record: RunRecord) -> RunRecord:
        """Mirror ``record`` of another store here, folder included, with the same status.

        A non-zero rank of a distributed run resumes from such a private copy of rank 0's run
        (``pipeline.execute_ranked``), so only rank 0 ever writes the user's store and folder; the
        status is kept (a ``stale`` run becomes ``interrupted``, a live one stays ``running``, owned
        by this process) so that every rank accepts or refuses the resume alike.
        """
        import shutil

        self.create(record.id, record.name, record.config)
        if record.status != "running":
            status = "interrupted" if record.status == "stale" else record.status
            self.update(record.id, status=status, error=record.error)
        shutil.copytree(record.dir, self.root / record.id, ignore=shutil.ignore_patterns(".lock"))
        return self.get(record.id)

    def claim(self, run_id: str) -> None:
        """Mark a run ``running`` again, owned by this process (a resume); its error is cleared."""
        me = Owner.current()
        self._write(
            "UPDATE runs SET status = 'running', ended = NULL, error = NULL, pid = ?, host = ?, pid_started = ?"
            " WHERE id = ?",
            (me.pid, me.host, me.started, run_id),
        )

    def update(
        self, run_id: str, *, status: str | None = None, metrics: dict[str, Any] | None = None, error: str | None = None
    ) -> None:
        """Change a run's status, metrics or error. A new status replaces the error (None clears it)."""
        sets: list[str] = []
        vals: list[Any] = []
        if status is not None:
            sets += ["status = ?", "ended = ?", "error = ?"]
            vals += [status, None if status == "running" else time.time(), error]
        elif error is not None:
            sets.append("error = ?")
            vals.append(error)
        if metrics is not None:
            sets.append("metrics = ?")
            vals.append(dumps(metrics, "metrics"))  # strict JSON: NaN as null
        if sets:
            self._write(f"UPDATE runs SET {', '.join(sets)} WHERE id = ?", (*vals, run_id))

    def _by_id(self, table: str, ref: str, what: str) -> list[sqlite3.Row]:
        """Rows of ``table`` whose id is ``ref``, else the one whose id starts with it (none: [])."""
        rows = self._rows(f"SELECT * FROM {table} WHERE id = ?", (ref,))  # noqa: S608 -- table is ours
        if not rows:
            pattern = _like_prefix(ref)
            rows = self._rows(f"SELECT * FROM {table} WHERE id LIKE ? ESCAPE '\\' ORDER BY started DESC", (pattern,))  # noqa: S608
            if len(rows) > 1:
                ids = ", ".join(r["id"] for r in rows[:5])
                raise RunNotFoundError(f"{what} {ref!r} is ambiguous: it is a prefix of {ids}")
        return rows

    def get(self, ref: str) -> RunRecord:
        """A run by id, unique id prefix, or name (the latest run of that name)."""
        rows = self._by_id("runs", ref, "run")
        if not rows:
            rows = self._rows("SELECT * FROM runs WHERE name = ? ORDER BY started DESC LIMIT 1", (ref,))
        if not rows:
            raise RunNotFoundError(f"no run {ref!r} in {self.path}; `brickwork runs` lists them")
        return self._record(rows[0])

    def list(self, limit: int = 50) -> list[RunRecord]:
        rows = self._rows("SELECT * FROM runs ORDER BY started DESC LIMIT ?", (limit,))
        return [self._record(r) for r in rows]

    def _record(self, row: sqlite3.Row) -> RunRecord:
        keys = row.keys()
        owner = None
        if "pid" in keys and row["pid"] is not None:
            owner = Owner(int(row["pid"]), str(row["host"]), row["pid_started"])
        rec = RunRecord(
            id=row["id"],
            name=row["name"],
            status=row["status"],
            started=row["started"],
            ended=row["ended"],
            dir=_run_dir(self.root, row["id"], row["dir"]),
            config=json.loads(row["config"]),
            metrics=json.loads(row["metrics"]),
            error=row["error"],
            owner=owner,
        )
        if "sweep" in keys and row["sweep"] is not None:
            rec.point = SweepPoint(row["sweep"], int(row["point"]), json.loads(row["point_values"]))
        if rec.status == "running" and not _owner_alive(rec):
            rec.status = "stale"
        return rec


def _like_prefix(ref: str) -> str:
    """A LIKE pattern for ids starting with ``ref``, read as literal text: `%` and `_` match only themselves."""
    return ref.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _run_dir(root: Path, run_id: str, stored: str) -> Path:
    """A run's folder from its ``dir`` column: absolute, relative to the store, or (schema 0)
    relative to the working directory of the run, which ends in the run's id."""
    path = Path(stored)
    if path.is_absolute():
        return path
    if path.name == run_id:
        return root / run_id
    return root / path


def _owner_alive(rec: RunRecord) -> bool:
    """Whether a ``running`` run still has a live owner; unknowable cases count as alive."""
    held = lock_held(rec.dir)
    if held is not None:
        return held
    alive = None if rec.owner is None else rec.owner.alive()
    return alive is not False


def _migrate_0_to_1(db: sqlite3.Connection, root: Path) -> None:
    """Schema 0 -> 1: owner columns; run folders stored relative to the store, not the old cwd."""
    columns = {r["name"] for r in db.execute("PRAGMA table_info(runs)")}
    if not columns:  # a new store
        for stmt in _SCHEMA.split(";"):
            if stmt.strip():
                db.execute(stmt)
        return
    for col in _OWNER_COLUMNS:
        if col.split()[0] not in columns:
            db.execute(f"ALTER TABLE runs ADD COLUMN {col}")
    for row in db.execute("SELECT id, dir FROM runs").fetchall():
        if not Path(row["dir"]).is_absolute() and Path(row["dir"]).name == row["id"]:
            db.execute("UPDATE runs SET dir = ? WHERE id = ?", (row["id"], row["id"]))


def _migrate_1_to_2(db: sqlite3.Connection) -> None:
    """Schema 1 -> 2: the ``sweeps`` table and the columns naming the sweep point a run is."""
    columns = {r["name"] for r in db.execute("PRAGMA table_info(runs)")}
    for col in _SWEEP_COLUMNS:
        if col.split()[0] not in columns:
            db.execute(f"ALTER TABLE runs ADD COLUMN {col}")
    for stmt in _SWEEP_SCHEMA.split(";"):
        if stmt.strip():
            db.execute(stmt)
