"""The ``brickwork`` console script: one command, with verbs.

Bad input (a config, a data file, a run id) is reported as one line on stderr, exit status 2,
no traceback. Ctrl-C or SIGTERM during a run records the run as interrupted (exit 130).
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sqlite3
import sys
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import NoReturn

from brickwork._version import __version__
from brickwork.errors import BrickworkError


def _modules(package: str, skip: AbstractSet[str] = frozenset()) -> list[str]:
    import importlib
    import pkgutil

    pkg = importlib.import_module(package)
    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if m.name not in skip and not m.ispkg)


def benches() -> list[str]:
    """Names of the benchmarks: modules of ``brickwork.bench`` with a ``main(argv)``."""
    return [n.replace("_", "-") for n in _modules("brickwork.bench")]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="brickwork", description="Modular neural networks from bricks.")
    p.add_argument("--version", action="version", version=f"brickwork {__version__}")
    p.add_argument(
        "--runs-dir",
        default=os.environ.get("BRICKWORK_RUNS", "runs"),
        help="folder of the run store and run folders (default: ./runs or $BRICKWORK_RUNS)",
    )
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    ls = sub.add_parser("ls", help="list registered bricks, models, datasets, stages, ...")
    ls.add_argument("kind", nargs="?", help="brick, model, dataset, router, loss, optimizer, op, stage")
    ls.add_argument("pattern", nargs="?", default="*", help="glob on the name, e.g. 'mlp*'")

    val = sub.add_parser("validate", help="check a config without running it")
    val.add_argument("config")
    val.add_argument("overrides", nargs="*", help="key.path=value (a comma list a,b sweeps the key)")
    val.add_argument("--yes", action="store_true", help=argparse.SUPPRESS)

    run = sub.add_parser("run", help="run a config: train, evaluate, report, record")
    run.add_argument("config", nargs="?")
    run.add_argument(
        "overrides", nargs="*", help="key.path=value; key.path=a,b,c sweeps the key (one run per grid point)"
    )
    run.add_argument("--resume", metavar="RUN", help="continue an interrupted or failed run, or a sweep")
    run.add_argument("--yes", action="store_true", help="run a sweep of more than 64 points")
    run.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="run on N local processes: launches `torchrun --nproc-per-node N -m brickwork run ...`",
    )
    run.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar (default: when stderr is a terminal)",
    )

    runs = sub.add_parser("runs", help="list recorded runs")
    runs.add_argument("--limit", type=int, default=30)

    show = sub.add_parser("show", help="show one run")
    show.add_argument("run", help="run id, id prefix or name; or a sweep id (sweep-...)")

    rep = sub.add_parser("report", help="print a run's report, or compare several runs")
    rep.add_argument("runs", nargs="+", help="run ids or names; or one sweep id (sweep-...)")
    rep.add_argument("--out", help="folder for the comparison report (default: RUNS_DIR/compare-<ids>)")

    bench = sub.add_parser("bench", help="benchmarks that print ratios against named baselines")
    bench.add_argument("name", choices=benches())
    bench.add_argument("args", nargs=argparse.REMAINDER, help="passed to the benchmark (try --help)")

    import importlib

    for name in _modules("brickwork.verbs"):
        mod = importlib.import_module(f"brickwork.verbs.{name}")
        verb = sub.add_parser(name.replace("_", "-"), help=mod.HELP, description=mod.HELP)
        mod.add_arguments(verb)
        verb.set_defaults(verb_module=mod)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    verb = ""
    try:
        args = _parser().parse_args(argv)
        verb = f" {args.verb}"
        code = _dispatch(args)
        sys.stdout.flush()  # a reader that went away (`| head`) shows here, not at interpreter exit
        return code
    except BrickworkError as e:
        if _speaks():
            print(f"brickwork{verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Also before a run exists (start-up, imports, config loading): one line, no traceback.
        print(f"brickwork{verb}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _stdout_gone()
    except (OSError, sqlite3.Error) as e:
        message = environment_error(e)
        if message is None:
            raise  # not the environment: a bug, with its traceback
        print(f"brickwork{verb}: error: {message}", file=sys.stderr)
        return 2


def _stdout_gone() -> int:
    """The reader of stdout went away (``brickwork ls | head -1``): exit quietly.

    As Python's documentation advises (``signal`` module, "Note on SIGPIPE"), stdout is pointed at
    devnull so that the interpreter's final flush does not raise again. The status is 141
    (128 + SIGPIPE), what a shell reports for a tool killed by the closed pipe.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 141


#: What to do about an error of the environment (the file system, not brickwork), by errno.
_RESUME = "free some space, then `brickwork run --resume RUN` (`brickwork runs` lists the runs)"
_WRITABLE = "use a writable folder (--runs-dir, --out)"
_ERRNO_HINTS = {
    errno.ENOSPC: _RESUME,
    errno.EDQUOT: _RESUME,
    errno.EROFS: _WRITABLE,
    errno.EACCES: _WRITABLE,
    errno.EPERM: _WRITABLE,
    errno.ENOTDIR: "a folder on the way is a file",
    errno.EISDIR: "a folder is where a file was expected",
    errno.ENAMETOOLONG: "use a shorter name",
    errno.EIO: "the device failed; check the disk",
}
#: SQLite's messages for the same conditions (its errors carry no errno).
_SQLITE_HINTS = {
    "database or disk is full": errno.ENOSPC,
    "readonly database": errno.EROFS,
    "unable to open database file": errno.EACCES,
    "disk i/o error": errno.EIO,
}


def environment_error(e: BaseException) -> str | None:
    """One line for an error of the file system (full, read-only, no permission), or None for others.

    Covers ``OSError`` with one of the errnos of :data:`_ERRNO_HINTS` (with the file named where the
    error names it) and ``sqlite3.OperationalError`` (the run store) with one of SQLite's messages
    for the same conditions. Anything else is not the user's environment and returns None.
    """
    if isinstance(e, sqlite3.OperationalError):
        text = str(e)
        code = next((c for m, c in _SQLITE_HINTS.items() if m in text.lower()), None)
        return None if code is None else f"run store: {text}: {os.strerror(code)} ({_ERRNO_HINTS[code]})"
    if isinstance(e, OSError) and e.errno in _ERRNO_HINTS:
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror or os.strerror(e.errno)} ({_ERRNO_HINTS[e.errno]})"
    return None


def _dispatch(args: argparse.Namespace) -> int:
    from brickwork.experiment.builtins import load_builtins

    load_builtins()  # every verb may name a registered entry (`ls`, a config, a bench's model)
    verb = args.verb
    if getattr(args, "verb_module", None) is not None:
        return int(args.verb_module.run(args) or 0)
    if verb == "ls":
        return _ls(args.kind, args.pattern)
    if verb == "bench":
        import importlib

        module = importlib.import_module(f"brickwork.bench.{args.name.replace('-', '_')}")
        return int(module.main(args.args) or 0)
    from brickwork.experiment import RunStore, load_config

    if verb == "validate":
        from brickwork.experiment.sweep import plan_sweep

        plan = plan_sweep(args.config, args.overrides, yes=args.yes)  # every point checked as `run` would
        if plan is not None:
            axes = ", ".join(f"{k} ({len(v)})" for k, v in plan.axes)
            print(f"{args.config}: valid sweep of {len(plan.values)} points over {axes}")
            return 0
        cfg = load_config(args.config, args.overrides)
        from brickwork.data import load_dataset
        from brickwork.experiment.preflight import check_models

        check_models(cfg, load_dataset(cfg.data.name, seed=cfg.seed, **cfg.data.args))  # what `run` would meet
        print(
            f"{args.config}: valid ({len(cfg.models)} model(s): {', '.join(cfg.models)}; "
            f"stages: {', '.join(s.name for s in cfg.stages)}; data: {cfg.data.name})"
        )
        return 0
    if verb == "run":
        return _run(args)
    store = RunStore(args.runs_dir)
    if verb == "runs":
        return _runs(store, args.limit)
    if verb == "show":
        return _show(store, args.run)
    if verb == "report":
        return _report(store, args.runs, args.out)
    raise AssertionError(verb)


def _speaks() -> bool:
    """False on the non-zero ranks of a torchrun launch: one message per run, from rank 0."""
    return os.environ.get("RANK", "0") in ("", "0")


def _run(args: argparse.Namespace) -> int:
    from brickwork.experiment import RunStore, execute, load_config
    from brickwork.experiment.sweep import is_sweep_ref, plan_sweep, resume_sweep, run_sweep

    if (args.config is None) == (args.resume is None):
        raise BrickworkError("give a config to run, or --resume RUN (not both)")
    plan = None if args.resume else plan_sweep(args.config, args.overrides, yes=args.yes)  # every point checked
    sweeping = plan is not None or (args.resume is not None and is_sweep_ref(args.resume))
    if sweeping:
        from brickwork.distributed import launched_by_torchrun

        if args.nproc is not None or launched_by_torchrun():
            raise BrickworkError("a sweep runs its points in one process; drop --nproc (or torchrun)")
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _raise_interrupt)
        if plan is not None:
            run_sweep(plan, args.runs_dir, progress=args.progress)
        else:
            resume_sweep(RunStore(args.runs_dir), args.resume, progress=args.progress)
        return 0
    cfg = None if args.resume else load_config(args.config, args.overrides)  # fails before any work
    if args.nproc is not None:
        return _launch(args)
    from brickwork.distributed import launched_by_torchrun

    if launched_by_torchrun():
        return _run_ranked(args, cfg)
    # A new run opens the store only after its data and models pass (nothing written otherwise).
    store = RunStore(args.runs_dir) if args.resume else args.runs_dir
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _raise_interrupt)
    if cfg is None:
        execute(None, store, resume=args.resume, progress=args.progress)  # type: ignore[arg-type]
    else:
        execute(cfg, store, progress=args.progress)
    return 0


def _launch(args: argparse.Namespace) -> int:
    """``brickwork run --nproc N``: the same command under ``torchrun`` (one machine, N ranks)."""
    import subprocess

    from brickwork.distributed import launched_by_torchrun

    if args.nproc < 1:
        raise BrickworkError(f"--nproc {args.nproc}: expected a number of processes >= 1")
    if launched_by_torchrun():
        raise BrickworkError("--nproc: this process is already a rank of a torchrun launch; drop --nproc")
    rest = [args.config, *args.overrides] if args.resume is None else ["--resume", args.resume]
    if args.progress is not None:
        rest.append("--progress" if args.progress else "--no-progress")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}"]
    cmd += ["-m", "brickwork", "--runs-dir", str(args.runs_dir), "run", *rest]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the ranks and torchrun themselves
    return subprocess.call(cmd)


def _run_ranked(args: argparse.Namespace, cfg: object) -> int:
    """One rank of a torchrun launch: join the group, run, leave (every rank, even on error)."""
    import torch.distributed

    from brickwork.distributed import init_from_env, shutdown
    from brickwork.experiment.pipeline import execute_ranked

    ctx = init_from_env()
    signal.signal(signal.SIGINT, _raise_interrupt)
    # torchrun's agent stops the surviving ranks with SIGTERM when one fails: a failed run
    signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        execute_ranked(cfg, args.runs_dir, ctx, resume=args.resume, progress=args.progress)  # type: ignore[arg-type]
    except (RuntimeError, torch.distributed.DistError) as e:
        # The run is recorded failed already; a broken or timed-out collective is the launch's
        # fault (a rank died or hung), not a bug: one line, not a traceback.
        text = str(e).strip()
        if not (isinstance(e, torch.distributed.DistError) or "gloo" in text or "NCCL" in text):
            raise
        raise BrickworkError(f"another rank stopped or hung: {text.splitlines()[0][:300]}") from None
    finally:
        shutdown(ctx)
    return 0


class RankStopped(BrickworkError):
    """The launcher stopped this rank (SIGTERM): another rank failed, or the launch was cancelled."""


def _raise_stopped(signum: int, frame: object) -> None:
    if _interrupted:
        return
    _interrupted.append(signum)
    raise RankStopped("stopped by the launcher (SIGTERM): another rank failed or the launch was cancelled")


def _raise_interrupt(signum: int, frame: object) -> None:
    """The first Ctrl-C or SIGTERM stops the run; later ones are ignored while it is recorded.

    A second interrupt raised inside the handler that records the first would abort that
    record and leave the run ``running``; the process is on its way out already.
    """
    if _interrupted:
        return
    _interrupted.append(signum)
    raise KeyboardInterrupt(f"signal {signum}")


_interrupted: list[int] = []  # the interrupt being handled, once one came


def _ls(kind: str | None, pattern: str) -> int:
    from brickwork.registry import KINDS, REGISTRY

    if kind is not None and kind not in KINDS:
        pattern, kind = kind, None  # `brickwork ls 'mlp*'`: the first argument was the pattern
    entries = REGISTRY.list(kind, pattern)
    if not entries:
        print(f"nothing registered matches {pattern!r}" + (f" in {kind}" if kind else ""))
        return 0
    current = None
    for e in entries:
        if e.kind != current:
            current = e.kind
            print(f"\n{e.kind}:")
        print(f"  {e.name:<22} {e.description}")
        params = ", ".join(p.describe() for p in e.params())
        if params:
            print(f"  {'':<22}   ({params})")
    if kind in (None, "router") and pattern == "*":
        _ls_aux_defaults()
    return 0


def _ls_aux_defaults() -> None:
    """The default ``aux_weights`` (each auxiliary loss at its paper's weight), after the routers."""
    from brickwork.nn.records import AUX_LOSS_DEFAULTS, UNLISTED_AUX_WEIGHT

    print(f"\naux_weights (defaults when a config does not set them; any other loss: {UNLISTED_AUX_WEIGHT}):")
    for name, d in AUX_LOSS_DEFAULTS.items():
        print(f"  {name:<22} {d.weight:g}  ({d.source})")


def _runs(store: object, limit: int) -> int:
    import time

    records = store.list(limit)  # type: ignore[attr-defined]
    if not records:
        print(f"no runs yet in {store.path}")  # type: ignore[attr-defined]
        return 0
    print(f"{'id':<21} {'name':<24} {'started':<16} {'status':<11} {'sweep (point)':<32} main metrics")
    for r in records:
        main = "; ".join(
            f"{label}: acc {m['test_accuracy']:.3f}"
            for label, m in r.metrics.items()
            if isinstance(m.get("test_accuracy"), (int, float))  # None: a NaN written as null
        )
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.started))
        point = "" if r.point is None else f"{r.point.sweep} ({r.point.index + 1})"
        print(f"{r.id:<21} {r.name[:24]:<24} {started:<16} {r.status:<11} {point:<32} {main}")
    return 0


def _show(store: object, ref: str) -> int:
    import time

    from brickwork.experiment.report import results_table, sweep_table
    from brickwork.experiment.sweep import describe, is_sweep_ref

    if is_sweep_ref(ref):
        sweep = store.get_sweep(ref)  # type: ignore[attr-defined]
        runs = store.sweep_runs(sweep.id)  # type: ignore[attr-defined]
        done = sum(r.status == "completed" for r in runs.values())
        print(f"sweep {sweep.id}  name {sweep.name}  {len(sweep.points)} points, {done} completed")
        print(f"started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(sweep.started))}")
        print(f"folder  {sweep.dir}")
        print("axes    " + "; ".join(describe({k: v}) for k, v in sweep.axes))
        print(sweep_table(sweep, runs))
        return 0
    r = store.get(ref)  # type: ignore[attr-defined]
    print(f"run {r.id}  name {r.name}  status {r.status}")
    print(
        f"started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(r.started))}"
        + (f", took {r.seconds:.1f} s" if r.seconds is not None else "")
    )
    print(f"folder  {r.dir}")
    if r.error:
        print(f"error   {r.error}")
    if r.metrics:
        print(results_table(r.metrics))
    report = Path(r.dir) / "report.md"
    if report.exists():
        print(f"report  {report}")
    return 0


def _report(store: object, refs: list[str], out: str | None) -> int:
    from brickwork.experiment.report import compare_dir_name, compare_runs, sweep_report
    from brickwork.experiment.sweep import is_sweep_ref

    if any(is_sweep_ref(ref) for ref in refs):
        if len(refs) > 1 or out is not None:
            raise BrickworkError("report SWEEP: give one sweep, without --out (its report goes in its folder)")
        sweep = store.get_sweep(refs[0])  # type: ignore[attr-defined]
        sweep.dir.mkdir(parents=True, exist_ok=True)
        path, _ = sweep_report(sweep, store.sweep_runs(sweep.id), sweep.dir)  # type: ignore[attr-defined]
        print(path.read_text())
        print(f"written to {path}")
        return 0
    records = [store.get(ref) for ref in refs]  # type: ignore[attr-defined]
    if len(records) == 1:
        report = Path(records[0].dir) / "report.md"
        if not report.exists():
            raise BrickworkError(f"run {records[0].id} has no report ({records[0].status}); it did not finish")
        print(report.read_text())
        return 0
    out_dir = Path(out) if out else Path(store.root) / compare_dir_name([r.id for r in records])  # type: ignore[attr-defined]
    if out_dir.exists() and not out_dir.is_dir():
        raise BrickworkError(f"--out {out_dir}: is a file, not a folder; name a new folder (nothing is overwritten)")
    if any(p.exists() and not p.is_dir() for p in out_dir.parents):
        raise BrickworkError(f"--out {out_dir}: a folder on the way is a file; name a new folder")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise BrickworkError(
            f"--out {out_dir}: folder exists and is not empty; name a new one (nothing is overwritten)"
        )
    path = compare_runs(records, out_dir)
    print(path.read_text())
    print(f"written to {path}")
    return 0


def entrypoint() -> NoReturn:
    sys.exit(main())


if __name__ == "__main__":
    entrypoint()
