"""Backend choice by measurement: time the candidates once per machine and shape class, cache the winner.

Which implementation of a hot operation is fastest depends on the CPU: the MoE grouped-matmul
backends and the group-sparse product paths swapped ranks between the AMD EPYC and the Intel
Xeon this project's machines come with (``/work/shared/notes/cpu-measurements.md``). So, as
cuDNN's benchmark mode and Triton's autotuner do, the first call of a *shape class* times every
applicable candidate on the call's own operands, picks the fastest and stores the choice in a
small JSON file, keyed by CPU model, torch version and shape class; every later call (and every
later process on the same machine) reads it.

* **Shape class** (:class:`ShapeClass`): the operation (``moe``, ``sparse``, ``malloc``), its
  sizes (the batch-like size bucketed to the next power of two, layer widths exact), dtype,
  device and pass (``fwd`` under ``no_grad``, ``fwd+bwd`` otherwise). Coarse on purpose: a
  training run meets a handful of classes, not one per batch size.
* **Cache file**: ``$BRICKWORK_CACHE_DIR/autotune.json``, else ``$XDG_CACHE_HOME/brickwork/``,
  else ``~/.cache/brickwork/``; written atomically (a temporary file, then ``os.replace``). A
  corrupt file is ignored with one warning and rewritten at the next choice.
* **Override**: ``BRICKWORK_BACKEND=moe=split,sparse=gather,malloc=tuned`` (any subset) pins a
  kind without timing; a pinned candidate that does not apply to a call (``grouped_mm`` in
  float64, ``band`` for a non-banded wiring) falls back to the first applicable one. A bad value
  raises :class:`~brickwork.errors.BrickworkError` naming the valid ones.
* **Cost**: one unrecorded warm-up call per candidate, then interleaved rounds until
  ``min_rounds`` (2) rounds are done and ``budget_s`` (0.3 s) of timed calls is spent, at most
  ``max_rounds`` (3); calls under ``min_flops`` (8 MFLOP forward) are not timed at all. The
  winner has the smallest minimum (the least disturbed sample on a shared machine), except that
  the preferred candidate (the first applicable one in :data:`KINDS` order) is kept unless
  another one's minimum is more than ``margin`` (10 %) below its own. A candidate that raises is dropped.

  Why the two guards (issue 16, ``docs/perf-notes.md``): with one timed round of a 0.1-1 s call
  and no margin, the choice between candidates a few percent apart was a coin toss on a shared
  machine, and it was made per product: the quiet-machine pass of session 5 ran 8192 tokens x 64
  experts on ``bmm`` + ``split`` (1.46x dense) and 2048 x 64 on ``split`` + ``grouped_mm``
  (1.88x), where the whole step measured (one thread, CPU clock) ``grouped_mm`` 1.13 / 1.30,
  ``split`` 1.24 / 1.39, ``bmm`` 1.38 / 1.64.

Every choice this process made (measured, cached or pinned) is kept in :func:`choices_made`, so
``brickwork bench`` prints it per cell and run reports list it.
"""

from __future__ import annotations

import json
import os
import platform
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from brickwork.errors import BrickworkError
from brickwork.persist import atomic_write_text

KINDS: dict[str, tuple[str, ...]] = {
    "moe": ("grouped_mm", "split", "bmm"),
    "sparse": ("band", "gather", "dense"),
    "malloc": ("no-mmap", "tuned", "default"),
}
"""Candidates of each kind, in order of preference (the fallback is the first applicable one)."""

ENV_OVERRIDE = "BRICKWORK_BACKEND"
CACHE_FILE = "autotune.json"
# The cache's format and measuring method; a file of another version is ignored (every class is
# measured again once) and rewritten. 2: malloc settings measured in a fresh process each (session 7).
CACHE_VERSION = 2

Timer = Callable[[str, Callable[[], object]], float]
"""Seconds one call of the named candidate took (tests inject a fake one)."""

Candidates = Mapping[str, Callable[[], object]]


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo``, with its family / model / stepping numbers, else
    what ``platform`` knows.

    The numbers matter: some virtual machines report only ``AMD EPYC`` as the model name, the same
    for CPU generations whose kernels rank differently (family 25 model 17 is Zen 4).
    """
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model", "stepping") and key not in fields:
                    fields[key] = value.strip()
                if not line.strip() and fields:
                    break  # the first processor's block is enough
    except OSError:
        pass
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    numbers = [f"{k} {fields[k]}" for k in ("cpu family", "model", "stepping") if k in fields]
    return fields["model name"] + (f" ({', '.join(numbers)})" if numbers else "")


def machine_key(device: str = "cpu") -> str:
    """What a cached choice is valid for: the CPU model (or GPU name) and the torch version."""
    hw = torch.cuda.get_device_name(0) if device.startswith("cuda") and torch.cuda.is_available() else cpu_model()
    return f"{hw} | torch {torch.__version__}"


def cache_dir() -> Path:
    """``$BRICKWORK_CACHE_DIR``, else ``$XDG_CACHE_HOME/brickwork``, else ``~/.cache/brickwork``."""
    if os.environ.get("BRICKWORK_CACHE_DIR"):
        return Path(os.environ["BRICKWORK_CACHE_DIR"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "brickwork"
    return Path.home() / ".cache" / "brickwork"


def bucket(n: int) -> int:
    """``n`` rounded up to a power of two (1 for n <= 1): the batch-like sizes of one shape class."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


@dataclass(frozen=True)
class ShapeClass:
    """A coarse class of calls that share one backend choice.

    Attributes:
        kind: ``"moe"``, ``"sparse"`` or ``"malloc"`` (a key of :data:`KINDS`).
        dims: sizes; the caller buckets the batch-like ones (:func:`bucket`).
        dtype: e.g. ``"float32"``.
        mode: ``"fwd"`` or ``"fwd+bwd"``.
        device: ``"cpu"`` or ``"cuda"``.
    """

    kind: str
    dims: tuple[int, ...]
    dtype: str
    mode: str
    device: str = "cpu"

    def key(self) -> str:
        return f"{self.kind} {'x'.join(map(str, self.dims))} {self.dtype} {self.mode} {self.device}"


def shape_class(
    kind: str, dims: Sequence[int], dtype: torch.dtype, device: torch.device | str, mode: str | None = None
) -> ShapeClass:
    """The class of a call made now; ``mode`` defaults to ``fwd+bwd`` when autograd is recording, else ``fwd``."""
    mode = mode or ("fwd+bwd" if torch.is_grad_enabled() else "fwd")
    return ShapeClass(
        kind, tuple(int(d) for d in dims), str(dtype).removeprefix("torch."), mode, torch.device(device).type
    )


def can_time(x: torch.Tensor) -> bool:
    """Whether a call on ``x`` may run timing calls now: not while compiling or tracing, not under a
    dispatch mode (``FlopCounterMode`` would count the candidates' FLOPs, fake tensors have no
    time), only for plain tensors on a CPU or CUDA device."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return (
        not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and _get_current_dispatch_mode() is None
        and x.device.type in ("cpu", "cuda")
        and type(x) in (torch.Tensor, torch.nn.Parameter)
    )


def overrides() -> dict[str, str]:
    """The kinds pinned by ``BRICKWORK_BACKEND`` (``kind=candidate`` pairs, comma separated)."""
    text = os.environ.get(ENV_OVERRIDE, "").strip()
    out: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        kind, _, value = item.partition("=")
        kind, value = kind.strip(), value.strip()
        if kind not in KINDS:
            raise BrickworkError(
                f"{ENV_OVERRIDE}: unknown kind {kind!r} in {text!r}; expected kind=backend with kind one of "
                f"{', '.join(KINDS)}"
            )
        if value not in KINDS[kind]:
            raise BrickworkError(
                f"{ENV_OVERRIDE}: {kind}={value!r} is not a {kind} backend; valid: {', '.join(KINDS[kind])}"
            )
        out[kind] = value
    return out


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def wall_timer(name: str, fn: Callable[[], object]) -> float:
    """Wall seconds of one call (GPU work waited for)."""
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t0


@dataclass
class Choice:
    """One shape class's backend and where it came from (``measured``, ``cached`` or ``pinned``)."""

    backend: str
    source: str
    seconds: dict[str, float]


class Autotuner:
    """Chooses backends by timing, with a JSON cache under :func:`cache_dir` (see the module doc).

    Args:
        path: the cache file (default: :func:`cache_dir` / ``autotune.json``, resolved per call).
        timer: times one call of a candidate (default :func:`wall_timer`).
        machine: the machine key (default :func:`machine_key` of the call's device).
        budget_s: timed seconds after which no further round starts.
        max_rounds: timed rounds at most.
        min_rounds: timed rounds at least (the budget does not stop the timing before them).
        margin: how much faster (as a fraction of its minimum) another candidate must be than the
            preferred one (the first applicable) to be chosen instead.
        min_flops: calls with fewer forward FLOPs are not timed (microseconds to gain, a timing
            run to pay: the demo's batch-64 layers spent more time tuning than they could save).
    """

    def __init__(
        self,
        path: Path | None = None,
        timer: Timer = wall_timer,
        machine: str | None = None,
        budget_s: float = 0.3,
        max_rounds: int = 3,
        min_flops: float = 2**23,
        min_rounds: int = 2,
        margin: float = 0.1,
    ) -> None:
        self._path, self.timer, self._machine = path, timer, machine
        self.budget_s, self.max_rounds, self.min_flops = budget_s, max_rounds, min_flops
        self.min_rounds, self.margin = min(min_rounds, max_rounds), margin
        self.made: dict[str, Choice] = {}
        self.shapes: dict[str, ShapeClass] = {}
        self.timings = 0  # how many shape classes were timed (tests check the cache is used)
        self.seconds_spent = 0.0  # wall seconds spent timing candidates (what tuning added to a run)
        self._memo: dict[tuple[str, str, str], Choice] = {}
        self._warned: set[Path] = set()

    def path(self) -> Path:
        return self._path if self._path is not None else cache_dir() / CACHE_FILE

    def choose(
        self,
        shape: ShapeClass,
        applicable: Sequence[str],
        bench: Callable[[], Candidates] | None = None,
        flops: float | None = None,
        *,
        measure: Callable[[], Mapping[str, float]] | None = None,
    ) -> str:
        """The backend for ``shape`` among ``applicable`` (in :data:`KINDS` order).

        ``bench`` builds zero-argument callables, one per applicable candidate, each doing one
        call on representative operands; it is only called when the class is neither pinned nor
        cached. With no ``bench`` (see :func:`can_time`) an uncached class gets the first applicable
        backend, neither cached nor recorded, and is timed at a later call that can. A call of under
        ``min_flops`` (``flops``, its forward FLOPs) is not worth timing: the first applicable one
        (source ``small``). ``measure``, instead of ``bench``, returns each candidate's seconds
        measured elsewhere (in a fresh process per candidate, for a setting that changes the
        process for good); the same margin rule then decides.
        """
        if not applicable:
            raise ValueError(f"autotune: no applicable {shape.kind} backend for {shape.key()}")
        pinned = overrides().get(shape.kind)
        if pinned is not None:
            return self._record(shape, Choice(pinned if pinned in applicable else applicable[0], "pinned", {}))
        if flops is not None and flops < self.min_flops:
            return self._record(shape, Choice(applicable[0], "small", {}))
        machine = self._machine or machine_key(shape.device)
        path = self.path()
        memo_key = (str(path), machine, shape.key())
        hit = self._memo.get(memo_key)
        if hit is not None and hit.backend in applicable:
            return self._record(shape, hit)
        entry = self._read(path).get(machine, {}).get(shape.key())
        if isinstance(entry, dict) and entry.get("backend") in applicable:
            choice = Choice(str(entry["backend"]), "cached", dict(entry.get("seconds", {})))
        elif len(applicable) == 1:
            return self._record(shape, Choice(applicable[0], "default", {}))
        elif bench is not None:
            choice = self._timed(machine, path, shape, lambda: self._measure(bench()))
        elif measure is not None:

            def decide() -> Choice:
                seconds = {n: float(t) for n, t in measure().items() if n in applicable}
                return self._decide(seconds, next(n for n in applicable if n in seconds))

            choice = self._timed(machine, path, shape, decide)
        else:  # cannot time now (a FLOP counter, tracing): the first one, not cached
            return applicable[0]
        self._memo[memo_key] = choice
        return self._record(shape, choice)

    def _timed(self, machine: str, path: Path, shape: ShapeClass, measure: Callable[[], Choice]) -> Choice:
        """``measure()``'s choice, cached, with the seconds it took counted."""
        t0 = time.perf_counter()
        choice = measure()
        self.seconds_spent += time.perf_counter() - t0
        self.timings += 1
        self._write(path, machine, shape, choice)
        return choice

    def _record(self, shape: ShapeClass, choice: Choice) -> str:
        self.made[shape.key()] = choice
        self.shapes[shape.key()] = shape
        return choice.backend

    def _measure(self, candidates: Candidates) -> Choice:
        """Warm-up call each, then interleaved timed rounds within the budget; smallest minimum wins,
        unless it is within ``margin`` of the preferred (first) candidate's minimum."""
        alive: dict[str, Callable[[], object]] = {}
        for name, fn in candidates.items():
            try:
                self.timer(name, fn)  # warm-up: lazy initialisation, first allocations
                alive[name] = fn
            except Exception:  # a candidate that fails here is simply not chosen
                continue
        if not alive:
            raise RuntimeError("autotune: every candidate failed")
        best: dict[str, float] = {}
        spent = 0.0
        for r in range(self.max_rounds):
            names = list(alive)
            start = r % len(names)
            for name in names[start:] + names[:start]:
                dt = self.timer(name, alive[name])
                best[name] = min(dt, best.get(name, float("inf")))
                spent += dt
            if spent >= self.budget_s and r + 1 >= self.min_rounds:
                break
        return self._decide(best, next(iter(alive)))  # candidates come in KINDS order: the first is preferred

    def _decide(self, best: dict[str, float], preferred: str) -> Choice:
        """The fastest of ``best`` (seconds per candidate), unless within ``margin`` of ``preferred``."""
        fastest = min(best, key=lambda n: best[n])
        if best[fastest] >= (1.0 - self.margin) * best[preferred]:
            fastest = preferred  # a gain within the noise of a shared machine is not worth a switch
        return Choice(fastest, "measured", best)

    def _read(self, path: Path) -> dict[str, dict[str, object]]:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            self._warn(path, f"unreadable ({e})")
            return {}
        machines = data.get("machines") if isinstance(data, dict) else None
        if not isinstance(machines, dict) or not all(isinstance(v, dict) for v in machines.values()):
            self._warn(path, "not a brickwork autotune cache")
            return {}
        if data.get("version") != CACHE_VERSION:
            return {}  # an older measuring method: measured again, rewritten at this version
        return machines

    def _warn(self, path: Path, why: str) -> None:
        if path not in self._warned:
            self._warned.add(path)
            warnings.warn(f"autotune cache {path} is {why}; ignoring it (it is rewritten)", stacklevel=4)

    def _write(self, path: Path, machine: str, shape: ShapeClass, choice: Choice) -> None:
        machines = self._read(path)
        # The load average is kept beside the choice: one measured on a busy machine may be worth
        # re-measuring (delete the file, or pin with BRICKWORK_BACKEND).
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else -1.0
        entry = {"backend": choice.backend, "seconds": choice.seconds, "load": round(load, 2)}
        machines.setdefault(machine, {})[shape.key()] = entry
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps({"version": CACHE_VERSION, "machines": machines}, indent=1, sort_keys=True)
            atomic_write_text(path, text + "\n")
        except OSError as e:  # a read-only home: the choice still holds for this process
            self._warn(path, f"not writable ({e})")


TUNER = Autotuner()
"""The process's tuner; kernels call :func:`choose`."""


def choose(
    shape: ShapeClass,
    applicable: Sequence[str],
    bench: Callable[[], Candidates] | None = None,
    flops: float | None = None,
    *,
    measure: Callable[[], Mapping[str, float]] | None = None,
) -> str:
    """:meth:`Autotuner.choose` of the process's tuner."""
    return TUNER.choose(shape, applicable, bench, flops, measure=measure)


def choices_made() -> dict[str, Choice]:
    """Shape class key -> the choice this process made for it (for bench output and run reports)."""
    return dict(TUNER.made)


def describe_choices(kinds: Sequence[str] = ("moe", "sparse", "malloc")) -> str:
    """One line: ``class=backend (source)`` for every class of ``kinds`` this process chose."""
    items = [f"{k} = {c.backend} ({c.source})" for k, c in sorted(TUNER.made.items()) if TUNER.shapes[k].kind in kinds]
    return "; ".join(items) or "none"


def backends_used(kind: str, mode: str | None = None) -> str:
    """The backends this process chose for ``kind`` (and ``mode``), distinct, in first-use order,
    joined by ``+``: what a benchmark cell prints in its backend column."""
    seen: list[str] = []
    for key, c in TUNER.made.items():
        shape = TUNER.shapes[key]
        if shape.kind == kind and (mode is None or shape.mode == mode) and c.backend not in seen:
            seen.append(c.backend)
    return "+".join(seen) or "-"
