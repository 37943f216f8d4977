"""Side-by-side timing, the one harness of brickwork: rotation after warm-up, median of repeats.

Every wall-clock figure (benchmarks, the latency a stage records, encode times of a report)
comes from :func:`time_rounds`:

* **Interleaved rotation.** Candidates run in rounds, each round calling every candidate once;
  round ``r`` starts with candidate ``r mod n`` (A B C, B C A, C A B, ...). Interleaving instead
  of timing A, A, ..., then B, B, ... keeps a slow drift of the machine (another process,
  thermal state) from landing on one candidate only, and rotating the start keeps any one
  candidate from always running right after another's garbage.
* **Warm-up.** The first ``warmup`` rounds (allocator, caches, lazy initialisation) run the
  same rotation and are not recorded.
* **Median** of the recorded samples, robust to the odd preempted call.
* **Contention filter (optional).** On a shared machine another process's burst lands on
  whichever candidate is running and shifts a ratio by 1.5x or more (``bench moe`` saw its
  dense baseline alone vary from 0.9 s to 1.5 s). With ``max_foreign`` set, the CPU time other
  processes used during every sample is read from ``/proc``; a sample is *clean* when that
  share of the machine stays at or under ``max_foreign``. Rounds then continue until every
  candidate has ``repeats`` clean samples or ``max_rounds`` is reached, and medians are taken
  over clean samples. Candidates that must not disturb each other (a memory-churning baseline
  and the candidate measured after it) are timed in separate calls, one rotation each
  (``bench moe`` does this for moe against dense and for moe against the loops).

* **Spread.** :func:`ratio_spread` gives the min / median / max of the per-round paired ratios;
  benchmarks print it beside the median, so two runs can be compared against it.
* **Isolation.** :func:`isolated` runs one benchmark cell (or candidate group) in a fresh
  *spawned* worker process with the parent's torch thread count (and a named glibc malloc
  setting applied before anything is allocated): the allocator's heap, the caches and lazily
  built state of earlier cells cannot reach it. In one process the same MoE cell (8192 tokens x
  64 experts) measured 1.28 or 1.65x dense depending on whether the loop baselines ran before it
  (issue 16); every ``brickwork bench`` runs its cells through this function.

The clock and the contention probe are arguments, so tests drive the harness with fake time.
:func:`measure_latency` is the harness applied to one model on one batch; :func:`describe_machine`
states where a figure was measured.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from brickwork.kernels.autotune import cpu_model
from brickwork.nn.modes import evaluating

T = TypeVar("T")

Clock = Callable[[], float]
"""Seconds, monotonic (``time.perf_counter``)."""

ForeignProbe = Callable[[], float]
"""Cumulative seconds of the whole machine (CPU-seconds / number of CPUs) used by other processes."""


@dataclass
class Samples:
    """Samples of one candidate: wall seconds and, per sample, the share of the CPUs other processes used."""

    seconds: list[float] = field(default_factory=list)
    foreign: list[float] = field(default_factory=list)

    def clean(self, max_foreign: float | None = None) -> list[float]:
        """Seconds of the samples taken while other processes used at most ``max_foreign`` of the CPUs."""
        if max_foreign is None:
            return list(self.seconds)
        return [t for t, f in zip(self.seconds, self.foreign, strict=True) if f <= max_foreign]

    def median(self, max_foreign: float | None = None) -> float:
        """Median over clean samples (over all samples when none is clean)."""
        return statistics.median(self.clean(max_foreign) or self.seconds)


def named_clock(name: str) -> Clock:
    """``"wall"``: ``time.perf_counter``; ``"cpu"``: ``time.process_time``, this process's CPU time
    (all its threads), which leaves out the time other processes take on a shared machine (not
    their cache and memory interference); the ``--clock`` option of the benchmarks."""
    if name not in ("wall", "cpu"):
        raise ValueError(f"named_clock: {name!r} is not a clock; expected wall or cpu")
    return time.process_time if name == "cpu" else time.perf_counter


def add_clock_option(parser: argparse.ArgumentParser, what: str = "this process's") -> None:
    """The benchmarks' ``--clock wall|cpu`` option (see :func:`named_clock`); ``what`` names whose
    CPU time ``cpu`` takes (a worker's, each subprocess's)."""
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help=f"wall clock, or {what} CPU time (other processes' time left out; with --threads 1)",
    )


def sync() -> None:
    """Wait for queued GPU work, so a sample times the work and not its launch."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def foreign_seconds() -> float:
    """Cumulative busy time of all CPUs minus this process's CPU time, per CPU, from ``/proc``; 0.0 off Linux."""
    try:
        with open("/proc/stat") as f:
            cpu = [int(v) for v in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    busy = sum(cpu) - cpu[3] - (cpu[4] if len(cpu) > 4 else 0)  # minus idle and iowait
    own = int(fields[11]) + int(fields[12])  # user + system jiffies of this process
    return (busy - own) / os.sysconf("SC_CLK_TCK") / (os.cpu_count() or 1)


def time_rounds(
    candidates: Mapping[str, Callable[[], object]],
    *,
    repeats: int = 5,
    warmup: int = 1,
    max_foreign: float | None = None,
    max_rounds: int | None = None,
    clock: Clock = time.perf_counter,
    probe: ForeignProbe = foreign_seconds,
) -> dict[str, Samples]:
    """Samples of every candidate, timed in rotating order after warm-up rounds.

    Args:
        candidates: name -> zero-argument callable doing one unit of work.
        repeats: recorded (clean) samples wanted per candidate.
        warmup: unrecorded rounds first.
        max_foreign: if set, a sample is clean only while other processes used at most this share
            of the CPUs (``probe`` is read around every call), and rounds go on until every
            candidate has ``repeats`` clean samples; if None, every sample is clean and exactly
            ``repeats`` rounds are recorded.
        max_rounds: recorded rounds at most (default ``4 * repeats``), for ``max_foreign``.
        clock: the time source.
        probe: cumulative foreign machine-seconds (read only with ``max_foreign``).

    Returns:
        name -> :class:`Samples`, one per recorded round.
    """
    names = list(candidates)
    if not names:
        raise ValueError("time_rounds: no candidates to time")
    out = {n: Samples() for n in names}
    rounds = repeats if max_foreign is None else (max_rounds if max_rounds is not None else 4 * repeats)
    for r in range(warmup + rounds):
        start = r % len(names)
        for n in names[start:] + names[:start]:
            f0 = probe() if max_foreign is not None else 0.0
            sync()
            t0 = clock()
            candidates[n]()
            sync()
            dt = clock() - t0
            if r < warmup:
                continue
            out[n].seconds.append(dt)
            out[n].foreign.append(max(0.0, probe() - f0) / dt if max_foreign is not None and dt > 0 else 0.0)
        if r >= warmup and all(len(s.clean(max_foreign)) >= repeats for s in out.values()):
            break
    return out


def interleaved(
    candidates: Mapping[str, Callable[[], object]],
    *,
    repeats: int = 5,
    warmup: int = 1,
    clock: Clock = time.perf_counter,
) -> dict[str, float]:
    """Median seconds per call of each candidate (:func:`time_rounds` without the contention filter)."""
    samples = time_rounds(candidates, repeats=repeats, warmup=warmup, clock=clock)
    return {n: s.median() for n, s in samples.items()}


def paired_ratio(a: Samples, b: Samples, max_foreign: float | None = None) -> float:
    """Median over rounds of ``a / b`` for the rounds where both samples are clean.

    Both candidates ran in the same round, moments apart, so a ratio per round cancels slow
    drifts of the machine that a ratio of two medians keeps; falls back to the ratio of medians
    when no round is clean for both.
    """
    return ratio_spread(a, b, max_foreign).median


@dataclass(frozen=True)
class Spread:
    """Min, median and max of a benchmark's per-round ratios, and how many rounds they cover."""

    min: float
    median: float
    max: float
    rounds: int

    def __str__(self) -> str:
        return f"{self.median:.3f} [{self.min:.3f}-{self.max:.3f}]"


def ratio_spread(a: Samples, b: Samples, max_foreign: float | None = None) -> Spread:
    """The per-round ratios ``a / b`` (rounds clean for both) as min / median / max.

    The median equals :func:`paired_ratio`; with no round clean for both, the ratio of medians
    (a spread of one value, 0 rounds).
    """
    limit = float("inf") if max_foreign is None else max_foreign
    pairs = [
        ta / tb
        for ta, fa, tb, fb in zip(a.seconds, a.foreign, b.seconds, b.foreign, strict=True)
        if fa <= limit and fb <= limit
    ]
    if not pairs:
        r = a.median(max_foreign) / b.median(max_foreign)
        return Spread(r, r, r, 0)
    return Spread(min(pairs), statistics.median(pairs), max(pairs), len(pairs))


_WORKER_MALLOC: list[str] = []  # the malloc setting a worker applied at start (empty: none)


def _worker_init(threads: int, malloc: str | None) -> None:
    torch.set_num_threads(threads)
    if malloc is not None:
        from brickwork.kernels.malloc import set_malloc

        _WORKER_MALLOC.append(set_malloc(malloc))


def process_facts() -> tuple[int, int, str]:
    """(pid, torch threads, malloc setting applied at worker start or ``""``) of the calling process:
    what :func:`isolated` hands a worker, checkable from the parent."""
    return os.getpid(), torch.get_num_threads(), "".join(_WORKER_MALLOC)


def isolated(fn: Callable[..., T], *args: Any, malloc_setting: str | None = None, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` run in a fresh spawned worker process; returns its (picklable) result.

    The worker gets this process's torch thread count and environment; ``malloc_setting`` (a
    :data:`brickwork.kernels.malloc.SETTINGS` name) is applied there before ``fn`` allocates
    anything. ``fn`` must be a module-level function (the worker imports it by name). Costs a
    process start and the imports (about 2-3 s on 2 cores), so one call per benchmark cell.
    """
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        max_workers=1, mp_context=ctx, initializer=_worker_init, initargs=(torch.get_num_threads(), malloc_setting)
    ) as pool:
        return pool.submit(fn, *args, **kwargs).result()


def run_cell(
    fn: Callable[..., T], *args: Any, in_process: bool = False, malloc_setting: str | None = None, **kwargs: Any
) -> T:
    """One benchmark cell: :func:`isolated` unless ``in_process`` (the old shared-process order,
    kept to show what isolation changes)."""
    if in_process:
        if malloc_setting is not None:
            from brickwork.kernels.malloc import set_malloc

            set_malloc(malloc_setting)
        return fn(*args, **kwargs)
    return isolated(fn, *args, malloc_setting=malloc_setting, **kwargs)


@torch.no_grad()
def measure_latency(
    model: nn.Module, x: Tensor, *, repeats: int = 5, warmup: int = 1, clock: Clock = time.perf_counter
) -> float:
    """Median seconds per sample of ``model(x)`` in eval mode, for the batch ``x`` of shape (B, ...).

    The model's training mode is restored afterwards.
    """
    with evaluating(model):
        seconds = interleaved({"model": lambda: model(x)}, repeats=repeats, warmup=warmup, clock=clock)["model"]
    return seconds / x.shape[0]


def cpu_caches() -> str:
    """The data and unified caches of CPU 0 (``/sys/devices/system/cpu/cpu0/cache``), e.g. ``L1d 48K, L2 2048K``."""
    out = []
    root = Path("/sys/devices/system/cpu/cpu0/cache")
    for d in sorted(root.glob("index*")):
        try:
            kind = (d / "type").read_text().strip()
            if kind == "Instruction":
                continue
            level, size = (d / "level").read_text().strip(), (d / "size").read_text().strip()
        except OSError:
            continue
        out.append(f"L{level}{'d' if kind == 'Data' else ''} {size}")
    return ", ".join(out) or "caches unknown"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, e.g. ``1.52 1.30 1.10``."""
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def describe_machine(malloc: str | None = None) -> str:
    """One line for a report: CPU model and caches, cores, load average now, torch version and
    threads, GPU if any, malloc setting."""
    parts = [
        f"CPU {cpu_model()}",
        f"caches {cpu_caches()}",
        f"{os.cpu_count()} cores, {len(os.sched_getaffinity(0))} visible",
        f"load average {load_average()}",
        f"torch {torch.__version__} with {torch.get_num_threads()} threads",
        f"Python {platform.python_version()}",
    ]
    if torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name(0)}")
    env = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    parts.append(f"malloc: {malloc or (env if env else 'glibc defaults')}")
    return "; ".join(parts)
