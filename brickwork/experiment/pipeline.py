"""The runner: validated config in, run folder and store entry out. Kept deliberately small.

For each model variant (and each seed, when the config repeats seeds) it builds the model,
then runs the stages in order. After every stage the variant's weights and progress are
saved, so ``--resume`` skips finished stages and the ``train`` stage continues from its last
epoch.
"""

from __future__ import annotations

import signal
import statistics
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml

from brickwork.data import Dataset, load_dataset
from brickwork.distributed import DistContext
from brickwork.distributed.batch import barrier
from brickwork.errors import BrickworkError, CheckpointError
from brickwork.experiment.build import apply_structure, build_model, model_meta
from brickwork.experiment.config import RunConfig, Spec, validate
from brickwork.experiment.context import StageContext
from brickwork.experiment.owner import RunBusyError, RunLock
from brickwork.experiment.preflight import check_models
from brickwork.experiment.report import results_table, write_report
from brickwork.experiment.store import RunRecord, RunStore, SweepPoint
from brickwork.persist import atomic_write_text, owned_folder, read_json, sweep, write_json
from brickwork.train import tensorboard
from brickwork.train.checkpoint import load_model, save_model


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise BrickworkError("device: 'cuda' was asked for but torch sees no CUDA device; use device: cpu or auto")
    return device


def variant_dir(run_dir: Path, cfg: RunConfig, label: str, seed: int) -> Path:
    """Where variant ``label`` trained with ``seed`` keeps its checkpoints."""
    return run_dir / label if cfg.seeds is None else run_dir / label / f"seed-{seed}"


def _opened(store: RunStore | str | Path) -> RunStore:
    return store if isinstance(store, RunStore) else RunStore(store)


def execute(
    cfg: RunConfig,
    store: RunStore | str | Path,
    *,
    resume: str | None = None,
    progress: bool | None = None,
    echo: Callable[[str], None] = print,
    point: SweepPoint | None = None,
) -> RunRecord:
    """Run ``cfg`` (or continue the run ``resume``) and record it in ``store``.

    ``store`` may be the store's folder: it is then opened (and created) only once the data and
    every model have passed their checks, so a config that fails leaves nothing on disk.
    ``point``: the sweep point a new run is (``experiment/sweep.py``), recorded with it.

    Raises:
        BrickworkError: bad input found before work started (nothing is recorded then).
        KeyboardInterrupt: the run was interrupted; it is recorded as ``interrupted``.
    """
    if resume is not None:
        runs = _opened(store)
        record = runs.get(resume)
        if record.status == "completed":
            raise BrickworkError(f"run {record.id} already completed; nothing to resume")
        if record.status == "running":
            raise RunBusyError(
                f"run {record.id} is still running ({record.owner or 'owner unknown'}); "
                "wait for it to end or stop it, then resume"
            )
        if not record.dir.is_dir():
            raise CheckpointError(f"run {record.id}: its folder {record.dir} is missing; nothing to resume")
        cfg = validate(record.config)
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = load_dataset(cfg.data.name, seed=cfg.seed, **cfg.data.args)  # bad data fails before a run exists
    check_models(cfg, data)  # a model that cannot be built for this data fails before a run exists too
    if resume is None:
        runs = _opened(store)
        record = runs.create(runs.new_id(), cfg.name, cfg.to_dict(), point=point)
        record.dir.mkdir(parents=True, exist_ok=False)
        lock = RunLock(record.dir, record.id)
        atomic_write_text(record.dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    else:
        # The lock, not the status read above, decides: two resumes racing get one winner.
        lock = RunLock(record.dir, record.id, who=str(record.owner or ""))
        try:
            runs.claim(record.id)
        except BaseException:
            lock.release()
            raise
    echo(f"run {record.id}: {data.summary()}")
    live = cfg.log.tensorboard is not False and tensorboard.available()
    if cfg.log.tensorboard is not False and not live and tensorboard.say_once():
        echo(tensorboard.NEEDS_EXTRA)
    try:
        with owned_folder(record.dir):  # this process alone writes here while it holds the lock
            if resume is not None:
                sweep(record.dir)  # what killed saves of the last owner left
            results = {}
            for label, spec in cfg.models.items():
                per_seed = [
                    _run_variant(cfg, label, spec, data, record.dir, seed, device, progress, resume is not None, live)
                    for seed in cfg.run_seeds
                ]
                results[label] = per_seed[0] if cfg.seeds is None else aggregate_seeds(per_seed, cfg.run_seeds)
            summary = {label: r["metrics"] for label, r in results.items()}
            write_json(record.dir / "metrics.json", summary)
            write_report(record.dir, cfg, data, results, run_id=record.id)
    except KeyboardInterrupt:
        _finish(runs, record.id, lock, "interrupted", error="interrupted (Ctrl-C or SIGTERM)")
        echo(f"run {record.id} interrupted; continue it with: brickwork run --resume {record.id}")
        raise
    except BaseException as e:
        _finish(runs, record.id, lock, "failed", error="".join(traceback.format_exception_only(e)).strip())
        raise
    _finish(runs, record.id, lock, "completed", metrics=summary)
    echo(results_table(summary))
    echo(f"run folder: {record.dir}")
    return runs.get(record.id)


def execute_ranked(
    cfg: RunConfig | None,
    store: str | Path,
    dist: DistContext,
    *,
    resume: str | None = None,
    progress: bool | None = None,
    echo: Callable[[str], None] = print,
) -> RunRecord | None:
    """:func:`execute` on every rank of a ``torchrun`` launch; rank 0 alone writes the store.

    Every rank runs the same stages (training needs them all; the other stages are cheap to
    repeat and keep the ranks in step). Rank 0 records the run in ``store`` and writes its folder,
    reports and plots; each other rank runs in a private store in a temporary folder, removed at
    the end, started for a resume from a copy of rank 0's run taken before rank 0 touches it.

    Returns:
        Rank 0's record; None on the other ranks.
    """
    import tempfile

    if dist.is_main:
        barrier(dist)  # the other ranks have copied the run to resume
        return execute(cfg, store, resume=resume, progress=progress, echo=echo)  # type: ignore[arg-type]
    with tempfile.TemporaryDirectory(prefix=f"brickwork-rank{dist.rank}-") as tmp:
        shadow = RunStore(Path(tmp) / "runs")
        try:
            if resume is not None:
                resume = shadow.adopt(RunStore(store).get(resume)).id
        finally:
            barrier(dist)
        execute(cfg, shadow, resume=resume, progress=False, echo=lambda line: None)  # type: ignore[arg-type]
    return None


@contextmanager
def _signals_deferred() -> Iterator[list[int]]:
    """Hold SIGINT and SIGTERM while a final state is written; yields the signals that came.

    A second Ctrl-C landing inside the recording of the first would otherwise abort it and
    leave the run ``running``. Only the main thread may set handlers; elsewhere nothing is held.
    """
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    held = (signal.SIGINT, signal.SIGTERM)
    before = {s: signal.getsignal(s) for s in held}
    for s in held:
        signal.signal(s, lambda signum, frame: caught.append(signum))
    try:
        yield caught
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def _finish(store: RunStore, run_id: str, lock: RunLock, status: str, **fields: Any) -> None:
    """Write a run's final state (retried while the store is locked), then let go of its folder.

    When the run already failed, a store that cannot be written is reported on stderr and the
    original error goes on; when it completed, that is an error of its own.
    """
    with _signals_deferred() as caught:
        try:
            store.update(run_id, status=status, **fields)
        except BrickworkError as e:
            if status == "completed":
                raise BrickworkError(f"run {run_id} completed, but its status could not be recorded: {e}") from None
            print(f"brickwork: run {run_id} is {status}, but the store could not record it: {e}", file=sys.stderr)
        finally:
            lock.release()
    if caught and status == "completed":
        raise KeyboardInterrupt  # asked to stop while the finished run was recorded: stop now


def _run_variant(
    cfg: RunConfig,
    label: str,
    spec: Spec,
    data: Dataset,
    run_dir: Path,
    seed: int,
    device: str,
    progress: bool | None,
    resume: bool,
    live: bool = False,
) -> dict[str, Any]:
    vdir = variant_dir(run_dir, cfg, label, seed)
    vdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = build_model(spec, data.in_shape, data.num_classes).to(device)
    state_file = vdir / "progress.json"
    state: dict[str, Any] = read_json(state_file) if resume and state_file.exists() else {}
    done = state.get("done", 0)
    structure = state.get("structure", [])
    if done:
        model = apply_structure(model, structure)
        load_model(vdir / "model", model, expect={"seed": seed})  # another seed's files are refused
    ctx = StageContext(
        label=label,
        model=model,
        data=data,
        dir=vdir,
        run_dir=run_dir,
        seed=seed,
        device=device,
        aux_weights=cfg.aux_weights,
        resume=resume,
        progress=progress,
        metrics=state.get("metrics", {}),
        history=state.get("history", []),
        points=state.get("points", []),
        report=state.get("report", []),
        structure=structure,
        tensorboard=run_dir / "tb" / label / f"seed{seed}" if live else None,
    )
    for i, stage in enumerate(cfg.stages):
        if i < done:
            continue
        if ctx.progress is not False and sys.stderr.isatty():
            who = label if cfg.seeds is None else f"{label} seed {seed}"
            print(f"[{who}] stage {i + 1}/{len(cfg.stages)}: {stage.name}", file=sys.stderr)
        ctx.stage = i
        stage.entry.obj(ctx, **stage.args)
        meta = model_meta(spec, data, ctx.structure, metrics=ctx.metrics, stage=i + 1, seed=seed)
        save_model(vdir / "model", ctx.model, meta)
        write_json(
            state_file,
            {
                "done": i + 1,
                "metrics": ctx.metrics,
                "history": ctx.history,
                "points": ctx.points,
                "report": ctx.report,
                "structure": ctx.structure,
            },
        )
    return {"metrics": ctx.metrics, "history": ctx.history, "points": ctx.points, "report": ctx.report}


def aggregate_seeds(results: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """Mean and standard deviation over seeds of every numeric metric and point.

    Metrics ``m`` become the mean, with ``m_std`` beside them (sample standard deviation);
    the training curves and report sections shown are the first seed's.
    """
    metrics: dict[str, Any] = {"seeds": len(seeds)}
    for key in results[0]["metrics"]:
        values = [r["metrics"].get(key) for r in results]
        if all(isinstance(v, (int, float)) for v in values):
            metrics[key] = statistics.fmean(values)
            metrics[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    points = []
    for i, p in enumerate(results[0]["points"]):
        same = [r["points"][i] for r in results if i < len(r["points"])]
        point = dict(p)
        for k in ("accuracy", "flops", "latency_us"):
            if k in p:
                point[k] = statistics.fmean(q[k] for q in same)
        point["accuracy_std"] = statistics.stdev(q["accuracy"] for q in same) if len(same) > 1 else 0.0
        points.append(point)
    return {"metrics": metrics, "history": results[0]["history"], "points": points, "report": results[0]["report"]}
