"""Sweeps: one config run over a grid of values of some of its keys, one recorded run per point.

An axis is a key path with a list of values, given on the command line as a comma list
(``stages[0].lr=1e-3,3e-3``) or in the config's ``sweep:`` block
(``sweep: {stages[0].lr: [1e-3, 3e-3]}``); the points are the cartesian product of the axes
(the first axis varies slowest). A comma inside brackets, braces or quotes does not split:
``hidden=[64,64]`` is one list value and ``data.path="a,b.csv"`` one string.

The whole grid is planned and checked before any point runs: every point's config is
validated and its models built for its data (as ``brickwork run`` checks one config), so a bad
point is one line naming the point and the key, and nothing is written. The plan (axes, and
every point's values and resolved config) is recorded in the run store first; each point then
runs as an ordinary run that names its sweep and point. Resuming a sweep keeps its completed
points, resumes an interrupted or failed point from its own checkpoints (bit-identical, as any
run), and runs the points that never started.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from brickwork.data import Dataset, load_dataset
from brickwork.errors import BrickworkError, ConfigError
from brickwork.experiment.config import _KEY, RunConfig, apply_override, load_config, read_yaml, validate
from brickwork.experiment.owner import RunLock
from brickwork.experiment.pipeline import execute
from brickwork.experiment.preflight import check_models
from brickwork.experiment.report import sweep_report
from brickwork.experiment.store import SWEEP_PREFIX, RunStore, SweepPoint, SweepRecord
from brickwork.persist import atomic_write_text

#: A sweep of more points than this runs only with ``--yes`` (``yes=True``): a typo such as a
#: fourth axis multiplies the work, and a grid is cheap to write and expensive to run.
MAX_POINTS = 64


@dataclass(frozen=True)
class SweepPlan:
    """A sweep checked whole: its axes, and each point's swept values and validated config."""

    name: str
    axes: list[tuple[str, list[Any]]]
    values: list[dict[str, Any]]
    configs: list[RunConfig]

    def points(self) -> list[dict[str, Any]]:
        """The points as the store records them: values and resolved config."""
        return [{"values": v, "config": c.to_dict()} for v, c in zip(self.values, self.configs, strict=True)]


def is_sweep_ref(ref: str) -> bool:
    """Whether a reference names a sweep (sweep ids start with ``sweep-``) rather than a run."""
    return ref.startswith(SWEEP_PREFIX)


def describe(values: dict[str, Any]) -> str:
    """``stages[0].lr=0.001, models.m.width=64``: a point's values on one line."""
    return ", ".join(f"{k}={_show(v)}" for k, v in values.items())


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (dict, list, str)) else str(value)


def canonical_key(key: str) -> str:
    """``stages.0.lr`` and ``stages[0].lr`` are one key: ``stages[0].lr``."""
    parts = [p.strip("[]") for p in _KEY.findall(key)]
    return "".join(f"[{p}]" if p.isdigit() else (f".{p}" if i else p) for i, p in enumerate(parts))


def split_items(text: str) -> list[str]:
    """The items of a comma list; commas inside ``[]``, ``{}``, or quotes do not split."""
    items, depth, quote, start, i = [], 0, "", 0, 0
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\" and quote == '"':
                i += 1  # an escaped character inside a double-quoted string
            elif ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
        i += 1
    return [*items, text[start:]]


def _parse(text: str) -> Any:
    """An override value as ``key=text`` would set it (YAML, or the plain string)."""
    holder: dict[str, Any] = {}
    apply_override(holder, f"value={text}")
    return holder["value"]


def plan_sweep(
    source: str | Path | dict[str, Any], overrides: Sequence[str] = (), *, yes: bool = False
) -> SweepPlan | None:
    """The sweep that a config and its overrides ask for, every point checked; None for a plain run.

    Raises:
        ConfigError: an empty, duplicate or overlapping axis, a swept key also set by a plain
            override, more than :data:`MAX_POINTS` points without ``yes``, or a point whose config
            is refused (the message names the point and the key).
    """
    raw = read_yaml(source) if isinstance(source, (str, Path)) else dict(source)
    block = raw.pop("sweep", None)
    axes: dict[str, list[str]] = {}  # canonical key -> override texts of its values
    if block is not None:
        if not isinstance(block, dict) or not block:
            raise ConfigError("sweep", "expected a mapping of key paths to lists of values", block)
        for key, values in block.items():
            where = f"sweep.{key}"
            if not isinstance(key, str) or not _KEY.findall(key):
                raise ConfigError("sweep", "expected key paths such as stages[0].lr", key)
            if not isinstance(values, list):
                raise ConfigError(where, "expected a list of values to sweep, e.g. [0.001, 0.003]", values)
            try:
                texts = [json.dumps(v, allow_nan=False) for v in values]
            except (TypeError, ValueError):
                raise ConfigError(where, "expected finite numbers, strings, lists or mappings", values) from None
            _add_axis(axes, key, texts, where)
    plain: list[str] = []
    for item in overrides:
        key, sep, text = item.partition("=")
        items = split_items(text) if sep and key else [text]
        if len(items) == 1:
            plain.append(item)
        else:
            _add_axis(axes, key, items, key)
    if not axes:
        return None
    for item in plain:
        key = canonical_key(item.partition("=")[0])
        for axis in axes:
            if key == axis or _overlap(key, axis):
                raise ConfigError(
                    key, f"is set by a plain override and swept (axis {axis}); drop one", show_value=False
                )
    sizes = [len(v) for v in axes.values()]
    total = 1
    for n in sizes:
        total *= n
    if total > MAX_POINTS and not yes:
        raise ConfigError(
            "sweep",
            f"{total} points ({' x '.join(map(str, sizes))}) is more than {MAX_POINTS}; pass --yes to run them all",
            show_value=False,
        )
    parsed = {key: [_parse(t) for t in texts] for key, texts in axes.items()}
    values, configs = [], []
    datasets: dict[str, Dataset] = {}
    for index, combo in enumerate(itertools.product(*(range(n) for n in sizes))):
        point = {key: parsed[key][j] for key, j in zip(axes, combo, strict=True)}
        texts = [f"{key}={axes[key][j]}" for key, j in zip(axes, combo, strict=True)]
        try:
            cfg = load_config(raw, [*plain, *texts])
            # What `run` checks before a run exists, for every point before any point runs.
            data_key = json.dumps([cfg.data.to_dict(), cfg.seed], sort_keys=True, default=str)
            if data_key not in datasets:
                datasets[data_key] = load_dataset(cfg.data.name, seed=cfg.seed, **cfg.data.args)
            check_models(cfg, datasets[data_key])
        except BrickworkError as e:
            raise BrickworkError(f"sweep point {index + 1} of {total} ({describe(point)}): {e}") from None
        values.append(point)
        configs.append(cfg)
    return SweepPlan(configs[0].name, list(parsed.items()), values, configs)


def _overlap(a: str, b: str) -> bool:
    """Whether one of two canonical keys holds the other (``models.m`` holds ``models.m.width``)."""
    return a.startswith((f"{b}.", f"{b}[")) or b.startswith((f"{a}.", f"{a}["))


def _add_axis(axes: dict[str, list[str]], key: str, texts: list[str], where: str) -> None:
    canon = canonical_key(key)
    if not canon:
        raise ConfigError(where, "expected a key path such as stages[0].lr", key)
    if canon in axes:
        raise ConfigError(
            canon, "is swept twice (an axis may appear once, in the sweep: block or an override)", show_value=False
        )
    for other in axes:
        if _overlap(canon, other):
            raise ConfigError(canon, f"overlaps the axis {other} (one key may not hold the other)", show_value=False)
    if not texts:
        raise ConfigError(canon, "empty sweep axis: expected at least one value", show_value=False)
    for i, t in enumerate(texts):
        if not t.strip():
            raise ConfigError(canon, f"sweep value {i + 1} of {len(texts)} is empty (a stray comma?)", show_value=False)
    parsed = [json.dumps(_parse(t), sort_keys=True, default=str) for t in texts]
    for i, p in enumerate(parsed):
        if p in parsed[:i]:
            raise ConfigError(canon, f"sweep value {texts[i].strip()} is given twice", show_value=False)
    axes[canon] = texts


def run_sweep(
    plan: SweepPlan,
    store: RunStore | str | Path,
    *,
    progress: bool | None = None,
    echo: Callable[[str], None] = print,
) -> SweepRecord:
    """Record ``plan`` in ``store`` and run its points in order; the sweep's report at the end.

    Raises:
        KeyboardInterrupt: the running point is recorded ``interrupted``; resume the sweep.
        BrickworkError: some points failed (each is recorded ``failed``; the others ran).
    """
    runs = store if isinstance(store, RunStore) else RunStore(store)
    sweep = runs.create_sweep(runs.new_sweep_id(), plan.name, plan.axes, plan.points())
    sweep.dir.mkdir(parents=True, exist_ok=True)
    plan_file = {"name": plan.name, "axes": {k: v for k, v in plan.axes}, "points": plan.values}
    atomic_write_text(sweep.dir / "sweep.yaml", yaml.safe_dump(plan_file, sort_keys=False))
    axes = " x ".join(f"{k} ({len(v)})" for k, v in plan.axes)
    echo(f"sweep {sweep.id}: {len(plan.values)} points over {axes}")
    return _run_points(runs, sweep, progress, echo)


def resume_sweep(
    store: RunStore,
    ref: str,
    *,
    progress: bool | None = None,
    echo: Callable[[str], None] = print,
) -> SweepRecord:
    """Continue the sweep ``ref``: completed points kept, the others resumed or started."""
    sweep = store.get_sweep(ref)
    started = store.sweep_runs(sweep.id)
    if len(started) == len(sweep.points) and all(r.status == "completed" for r in started.values()):
        raise BrickworkError(f"sweep {sweep.id} already completed; nothing to resume")
    for p in sweep.points:
        validate(p["config"])  # what was checked when it was planned; refused now if brickwork changed
    sweep.dir.mkdir(parents=True, exist_ok=True)
    return _run_points(store, sweep, progress, echo)


def _run_points(runs: RunStore, sweep: SweepRecord, progress: bool | None, echo: Callable[[str], None]) -> SweepRecord:
    lock = RunLock(sweep.dir, sweep.id)  # one process runs a sweep's points at a time
    failed: list[int] = []
    try:
        started = runs.sweep_runs(sweep.id)
        for i, p in enumerate(sweep.points):
            rec = started.get(i)
            what = f"sweep {sweep.id}: point {i + 1}/{len(sweep.points)} ({describe(p['values'])})"
            if rec is not None and rec.status == "completed":
                echo(f"{what}: completed as run {rec.id}, kept")
                continue
            echo(what + ("" if rec is None else f": resuming run {rec.id}"))
            try:
                if rec is None:
                    point = SweepPoint(sweep.id, i, p["values"])
                    execute(validate(p["config"]), runs, progress=progress, echo=echo, point=point)
                else:
                    execute(None, runs, resume=rec.id, progress=progress, echo=echo)  # type: ignore[arg-type]
            except KeyboardInterrupt:
                echo(f"sweep {sweep.id} interrupted; continue it with: brickwork run --resume {sweep.id}")
                raise
            except BrickworkError as e:
                echo(f"{what}: failed: {e}")
                failed.append(i + 1)
    finally:
        lock.release()
    path, table = sweep_report(sweep, runs.sweep_runs(sweep.id), sweep.dir)
    echo(table)
    echo(f"sweep report: {path}")
    if failed:
        raise BrickworkError(
            f"sweep {sweep.id}: point(s) {', '.join(map(str, failed))} of {len(sweep.points)} failed (see above); "
            f"`brickwork run --resume {sweep.id}` runs them again"
        )
    return sweep
