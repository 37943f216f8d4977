"""Who owns a run: the process recorded in the store and the lock it holds on the run folder.

A run's process takes an exclusive ``flock`` on ``RUN_DIR/.lock`` for the run's whole life, so
the kernel itself says whether the owner is alive: the lock goes when the process dies, however
it dies (SIGKILL included), and a second process (``run --resume`` of a live run) cannot take
it. The pid, host and process start time recorded beside it in the store say *who* holds it,
and answer for runs whose lock file is not there yet (the moment between the store insert and
the lock) or never was (runs recorded before the lock existed).
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from brickwork.errors import BrickworkError

LOCK_NAME = ".lock"


class RunBusyError(BrickworkError):
    """The run folder is locked by another live process."""


def process_start(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), or None where ``/proc`` cannot say.

    With the pid, it names one process: a pid reused by a later process has a later start.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, after the parenthesised command name
        boot = next(
            float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime")
        )
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return round(boot + ticks / os.sysconf("SC_CLK_TCK"), 2)


@dataclass(frozen=True)
class Owner:
    """The process that runs (or ran) a run."""

    pid: int
    host: str
    started: float | None

    @classmethod
    def current(cls) -> Owner:
        return cls(os.getpid(), socket.gethostname(), process_start(os.getpid()))

    def alive(self) -> bool | None:
        """Whether this process still runs; None when it is on another host (we cannot tell)."""
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # exists, owned by another user
        now = process_start(self.pid)
        # A start more than a second away is another process that reused the pid.
        return self.started is None or now is None or abs(now - self.started) < 1.0

    def __str__(self) -> str:
        since = "" if self.started is None else time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on {self.host}{since}"


def lock_held(run_dir: Path) -> bool | None:
    """Whether a live process holds the run folder's lock; None when there is no lock file."""
    try:
        fd = os.open(run_dir / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's shared lock, if it got one
    return False


class RunLock:
    """An exclusive lock on a run folder, held until :meth:`release` or the process ends."""

    def __init__(self, run_dir: Path, run_id: str, who: str = "") -> None:
        self.path = run_dir / LOCK_NAME
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        # A reader probing the lock (`brickwork runs`) holds it for microseconds: try a few times.
        for attempt in range(20):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == 19:
                    os.close(fd)
                    raise RunBusyError(
                        f"run {run_id} is still running ({who or 'another process holds ' + str(self.path)}); "
                        "wait for it to end or stop it, then resume"
                    ) from None
                time.sleep(0.05)
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
