"""Shared fixtures: a tiny config on real data (digits), a fresh run store per test, the CLI."""

from __future__ import annotations

import contextlib
import copy
import io
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

TINY: dict[str, Any] = {
    "name": "tiny",
    "seed": 0,
    "data": {"name": "digits"},
    "models": {"mlp": {"name": "mlp", "width": 32, "depth": 2, "dropout": 0.1}},
    "stages": [
        {"stage": "train", "epochs": 3, "batch_size": 64, "lr": 0.01},
        {"stage": "evaluate", "latency_repeats": 1},
    ],
}


def pytest_configure(config: pytest.Config) -> None:
    # `make test` runs the suite in two pytest-xdist workers, one per core (most tests are tiny
    # tensors in one Python thread, and the CLI ones wait on processes). One torch thread per
    # worker keeps the two from oversubscribing the cores with OpenMP threads that spin-wait.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
        # xdist's workers ignore SIGINT (Ctrl-C is the controller's); the tests of interrupts need
        # what a user's interpreter has: Python's handler, which raises KeyboardInterrupt.
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def tiny_config() -> dict[str, Any]:
    return copy.deepcopy(TINY)


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    return tmp_path / "runs"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# Backend choice by measurement (brickwork.kernels.autotune) must not time anything in a test
# process, nor read or write the user's cache: the cache goes to a temporary folder and every kind
# is pinned to the path the tests were written against (grouped_mm where it runs, the strided band
# view for banded wirings, glibc with mmap off). Set on os.environ so subprocesses inherit it; the
# autotune tests unset the pin with monkeypatch.
PINNED_BACKENDS = "moe=grouped_mm,sparse=band,malloc=no-mmap"


@pytest.fixture(autouse=True, scope="session")
def _pinned_backends(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["BRICKWORK_CACHE_DIR"] = str(tmp_path_factory.mktemp("brickwork-cache"))
    os.environ["BRICKWORK_BACKEND"] = PINNED_BACKENDS


@pytest.fixture
def killed_then_resumed(monkeypatch: pytest.MonkeyPatch):
    """``run(cfg, runs_dir, steps)``: run ``cfg`` in a fresh store, kill it (KeyboardInterrupt, as
    Ctrl-C does) after ``steps`` training steps, then resume it; returns the store and the resumed
    run's record. The tests of structural stages compare its weights with an uninterrupted run."""
    from brickwork.experiment import RunStore, execute, validate
    from brickwork.train import loop

    def run(cfg: dict[str, Any], runs_dir: Path, steps: int) -> tuple[Any, Any]:
        real, calls = loop.train_step, {"n": 0}

        def step(*args: Any, **kwargs: Any) -> Any:
            calls["n"] += 1
            if calls["n"] > steps:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        monkeypatch.setattr(loop, "train_step", step)
        store = RunStore(runs_dir)
        with pytest.raises(KeyboardInterrupt):
            execute(validate(cfg), store, progress=False, echo=lambda s: None)
        monkeypatch.undo()
        (rec,) = store.list()
        return store, execute(None, store, resume=rec.id, progress=False, echo=lambda s: None)

    return run


def _event_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag in ``folder``'s TensorBoard event files, as (step, value) in step order."""
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator", reason="needs the tensorboard extra"
    )
    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture
def tb_scalars():
    """``tb_scalars(folder)``: the scalars of a TensorBoard folder (skips without the extra)."""
    return _event_scalars


@pytest.fixture
def tb_epoch_losses(tb_scalars):
    """``tb_epoch_losses(run_dir, label)``: ``{stage folder: [train/epoch_loss values]}`` of one
    variant's seed-0 TensorBoard folders, for the stages that train; None without the
    ``tensorboard`` extra (runs then write no curves), so a test checks its curves only with it."""
    from brickwork.train import tensorboard

    if not tensorboard.available():
        return None

    def read(run_dir: Path, label: str) -> dict[str, list[float]]:
        root = run_dir / "tb" / label / "seed0"
        out = {}
        for events in sorted(root.rglob("events.out.tfevents.*")):
            folder = events.parent
            scalars = tb_scalars(folder)
            if "train/epoch_loss" in scalars:
                out[folder.relative_to(root).as_posix()] = [v for _, v in scalars["train/epoch_loss"]]
        return out

    return read


@pytest.fixture
def one_torch_thread():
    """Torch on one thread for the test, restored after: tiny shapes run faster on one thread, and
    immune to OpenMP waits when other processes compete for the cores. Test files of tiny tensor
    checks use it for every test: ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


ROOT = Path(__file__).resolve().parents[1]


@dataclass
class CliResult:
    """What ``brickwork ARGS`` gave: its exit status and what it wrote."""

    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: str, cwd: Path | None = None, fresh_process: bool = False) -> CliResult:
    """``brickwork ARGS``, by default in this process: ``cli.main`` with stdout and stderr captured
    and what it sets for the process (signal handlers, torch's thread count, the working folder)
    restored. A fresh interpreter costs about 2.4 s of start-up (torch's import) on this machine kind,
    so only the tests of what a shell sees (the interpreter's own exit, no traceback from it, signals,
    pipes, warnings printed at import) ask for ``fresh_process``: the console script as a user runs it."""
    if fresh_process:
        # mutmut's stats pass runs the tests with MUTANT_UNDER_TEST=stats, and a child process in
        # another working directory then fails looking for mutmut's config (its hits would not be
        # recorded anyway).
        env = {k: v for k, v in os.environ.items() if (k, v) != ("MUTANT_UNDER_TEST", "stats")}
        env["PYTHONPATH"] = str(ROOT)
        r = subprocess.run(
            [sys.executable, "-m", "brickwork", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
        )
        return CliResult(r.returncode, r.stdout, r.stderr)
    from brickwork.cli import main

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    threads, here = torch.get_num_threads(), os.getcwd()
    out, err = io.StringIO(), io.StringIO()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    finally:
        os.chdir(here)
        for s, h in handlers.items():
            signal.signal(s, h)
        torch.set_num_threads(threads)
    return CliResult(code, out.getvalue(), err.getvalue())


@pytest.fixture
def brickwork_cli():
    """:func:`run_cli`: ``brickwork_cli("run", cfg)`` in this process, ``fresh_process=True`` for a
    real console-script process."""
    return run_cli
