"""Mutation testing of brickwork's core with mutmut, one package at a time (`make mutation`).

Each target mutates only its own modules (``only_mutate``) and runs only the tests that mirror
them, in a private copy of the tracked files (mutmut works in ``mutants/`` beside a
``pyproject.toml`` whose ``[tool.mutmut]`` section it reads; each copy gets its own section).
The run is niced and uses torch-safe process isolation (forkserver). Results: one line per target
(killed / survived / timeouts / no tests, and the score killed / (killed + survived + timeouts))
and a JSON summary in ``mutation-results.json``; the surviving mutants of a target are listed with
``cd <copy> && mutmut results`` and shown with ``mutmut show NAME``.

Usage:
    python tools/mutation.py                # every target (hours on 2 cores)
    python tools/mutation.py routing exits  # some targets
    python tools/mutation.py --list
    python tools/mutation.py kernels --max-children 1 --workdir /tmp/mut-a
    python tools/mutation.py kernels --resume              # go on where a stopped run was
    python tools/mutation.py kernels --mutants 'brickwork.kernels.grouped*'  # (re)test some only
    python tools/mutation.py kernels --survivors           # re-test survivors after new tests

``--resume``, ``--mutants`` and ``--survivors`` reuse the target's copy and mutmut's verdicts: the
copy's tests (and tools) are refreshed from the checkout, its sources are not, so the mutants
stay the ones already judged. The test selection must not change in between (mutmut would then
judge every mutant again).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# target: (modules mutated, tests run). The tests are those that mirror the modules.
TARGETS: dict[str, tuple[list[str], list[str]]] = {
    "routing": (
        ["brickwork/nn/routing/*", "brickwork/nn/moe.py"],
        [
            "tests/nn/test_routing_routers.py",
            "tests/nn/test_routing_losses.py",
            "tests/nn/test_routing_properties.py",
            "tests/nn/test_moe.py",
            "tests/nn/test_noisy_topk.py",
            "tests/nn/test_token_hash.py",
        ],
    ),
    "kernels": (["brickwork/kernels/*"], ["tests/kernels"]),
    "sparse": (
        ["brickwork/nn/sparse/*"],
        [
            "tests/nn/test_sparse_linear.py",
            "tests/nn/test_sparse_connectivity.py",
            "tests/nn/test_sparse_rewiring.py",
            "tests/nn/test_sparse_edge_rewiring.py",
            "tests/nn/test_sparse_properties.py",
        ],
    ),
    "nested": (
        ["brickwork/nn/nested/*"],
        ["tests/nn/test_nested.py", "tests/nn/test_nested_properties.py", "tests/ops/test_slice.py"],
    ),
    "exits": (
        ["brickwork/nn/exits.py"],
        [
            "tests/nn/test_exits.py",
            "tests/nn/test_exits_values.py",
            "tests/nn/test_jei.py",
            "tests/analysis/test_exits.py",
        ],
    ),
    "mod": (["brickwork/nn/mod.py"], ["tests/nn/test_mod.py", "tests/nn/test_mod_properties.py"]),
    "compute": (
        ["brickwork/analysis/compute.py"],
        ["tests/analysis/test_compute.py", "tests/analysis/test_compute_counting.py"],
    ),
    "persist": (["brickwork/persist.py"], ["tests/test_persist.py", "tests/test_persist_cleanup.py"]),
    "train": (["brickwork/train/*"], ["tests/train"]),
    "config": (
        ["brickwork/experiment/config.py"],
        ["tests/experiment/test_config.py", "tests/experiment/test_bad_configs.py"],
    ),
    "ops": (["brickwork/ops/*"], ["tests/ops"]),
}


def _copy_tree(dest: Path) -> None:
    """The tracked files (and untracked, not ignored ones) of the checkout, into ``dest``."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    if dest.exists():
        shutil.rmtree(dest)
    for rel in files:
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def _config(only: list[str], tests: list[str]) -> str:
    quoted = ", ".join(f'"{p}"' for p in only)
    selected = ", ".join(f'"{t}"' for t in tests)
    return (
        "\n[tool.mutmut]\n"
        'source_paths = ["brickwork"]\n'
        # mutmut runs the tests in mutants/, which holds only the sources and tests/: the shipped
        # configs and the tools some tests read (configs/**, tools/make_example_data.py) go along.
        'also_copy = ["configs", "tools"]\n'
        f"only_mutate = [{quoted}]\n"
        f"pytest_add_cli_args_test_selection = [{selected}]\n"
        # torch._dynamo as a plugin: imported once in mutmut's fork server, not in every mutant's
        # process (a first optimizer step imports it lazily: ~9 s each on 2 loaded cores).
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-p", "torch._dynamo", "-q", "-x"]\n'
        'process_isolation = "forkserver"\n'
        "use_git_change_detection = false\n"
        # mutmut's wall-clock limit per mutant is (estimated test time + timeout_constant) * 15 s. At
        # the default constant of 1 s, on the loaded 2-core machine (a niced worker got ~10 % of a
        # core), mutants whose tests pass were reported as timeouts, i.e. as killed; 10 s leaves room.
        "timeout_constant = 10.0\n"
    )


def _refresh_tests(copy: Path) -> None:
    """The checkout's test files (and tools) into an existing copy; its sources stay as they were."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "tests", "tools"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    for rel in files:
        src = ROOT / rel
        if src.is_file():
            (copy / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, copy / rel)


def _survivors(copy: Path, mutmut: Path, env: dict[str, str]) -> list[str]:
    """The names of the mutants that survived (or had no test) in the copy's last run."""
    out = subprocess.run([str(mutmut), "results"], cwd=copy, env=env, capture_output=True, text=True).stdout
    names = []
    for line in out.splitlines():
        name, _, status = line.strip().partition(": ")
        if status in ("survived", "no tests"):
            names.append(name)
    return names


def run_target(
    name: str,
    workdir: Path,
    mutmut: Path,
    *,
    reuse: bool = False,
    mutants: list[str] | None = None,
    survivors: bool = False,
    max_children: int | None = None,
) -> dict[str, object]:
    only, tests = TARGETS[name]
    copy = workdir / name
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(copy)}
    if (reuse or mutants or survivors) and (copy / "mutants").is_dir():
        _refresh_tests(copy)
    else:
        _copy_tree(copy)
        with open(copy / "pyproject.toml", "a") as f:
            f.write(_config(only, tests))
    names = list(mutants or [])
    if survivors:
        names += _survivors(copy, mutmut, env)
        if not names:
            return {"target": name, "modules": only, "tests": tests, "score": None, "seconds": 0, "returncode": 0}
    cmd = ["nice", "-n", "19", str(mutmut), "run"]
    if max_children:
        cmd += ["--max-children", str(max_children)]
    t0 = time.time()
    run = subprocess.run(cmd + names, cwd=copy, env=env, capture_output=True, text=True)
    subprocess.run([str(mutmut), "export-cicd-stats"], cwd=copy, env=env, capture_output=True, text=True)
    stats_file = copy / "mutants" / "mutmut-cicd-stats.json"
    stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
    killed, survived = int(stats.get("killed", 0)), int(stats.get("survived", 0))
    timeouts = int(stats.get("timeout", 0))
    judged = killed + survived + timeouts
    return {
        "target": name,
        "modules": only,
        "tests": tests,
        **stats,
        "score": (killed + timeouts) / judged if judged else None,
        "seconds": round(time.time() - t0),
        "returncode": run.returncode,
        "copy": str(copy),
        "log_tail": (run.stdout + run.stderr)[-2000:] if run.returncode else "",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", help=f"some of: {', '.join(TARGETS)} (default: all)")
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "brickwork-mutation")
    parser.add_argument("--list", action="store_true", help="print the targets and exit")
    parser.add_argument("--max-children", type=int, help="parallel mutmut workers (default: one per core)")
    parser.add_argument("--resume", action="store_true", help="reuse the copy; test the mutants without a verdict")
    parser.add_argument("--mutants", nargs="+", metavar="PATTERN", help="(re)test only these mutant names / globs")
    parser.add_argument("--survivors", action="store_true", help="re-test the survivors of the copy's last run")
    args = parser.parse_args(argv)
    if args.list:
        for name, (only, tests) in TARGETS.items():
            print(f"{name}: mutates {' '.join(only)}; runs {' '.join(tests)}")
        return 0
    unknown = [t for t in args.targets if t not in TARGETS]
    if unknown:
        print(f"mutation: unknown target(s) {unknown}; expected some of {list(TARGETS)}", file=sys.stderr)
        return 2
    mutmut = Path(sys.executable).with_name("mutmut")
    if not mutmut.exists():
        print("mutation: mutmut is not installed (it is in the dev extra: pip install -e '.[dev]')", file=sys.stderr)
        return 2
    results = []
    for name in args.targets or list(TARGETS):
        r = run_target(
            name,
            args.workdir,
            mutmut,
            reuse=args.resume,
            mutants=args.mutants,
            survivors=args.survivors,
            max_children=args.max_children,
        )
        results.append(r)
        score = "n/a" if r["score"] is None else f"{r['score']:.1%}"
        print(
            f"{name:8s} killed {r.get('killed', 0):4} survived {r.get('survived', 0):4} "
            f"timeout {r.get('timeout', 0):3} no tests {r.get('no_tests', 0):4}  score {score}  ({r['seconds']} s)",
            flush=True,
        )
        if r["returncode"]:
            print(f"  mutmut exited {r['returncode']}:\n{r['log_tail']}", file=sys.stderr)
    out = args.workdir / "mutation-results.json"
    earlier = json.loads(out.read_text()) if out.exists() else []  # other targets' last results stay
    done = {r["target"] for r in results}
    out.write_text(json.dumps([r for r in earlier if r.get("target") not in done] + results, indent=2))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
