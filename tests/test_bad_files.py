"""The corpus of bad files (tests/corpus/files/cases.py), each met where a user meets it:
``brickwork run`` on a config naming a bad data file; ``run --resume`` and ``slice`` on a run
whose checkpoint files were damaged. Each is one line on stderr, exit status 2, no traceback,
and nothing in the run's folder is written or changed."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from brickwork.experiment import RunStore, execute, validate
from brickwork.persist import write_json

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bad_file_cases", ROOT / "tests" / "corpus" / "files" / "cases.py")
assert _spec is not None and _spec.loader is not None
cases = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = cases  # dataclasses look their module up while the file executes
_spec.loader.exec_module(cases)


#: Cases also run through the real console script (a fresh process: exit status and stderr as a
#: shell sees them, no traceback from the interpreter); the others call the CLI's ``main`` in this
#: process (conftest's ``brickwork_cli``), which imports torch once instead of once per case.
SUBPROCESS = {"csv-non-utf8", "npz-truncated", "model-truncated-safetensors", "state-nan-optimizer"}


def assert_one_line_refusal(r: Any, expected: str) -> None:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert expected in r.stderr, r.stderr


def test_the_corpus_has_at_least_20_bad_files():
    assert len(cases.DATA) + len(cases.CHECKPOINT) >= 20
    kinds = {name.split("-")[0] for name in [*cases.DATA, *cases.CHECKPOINT]}
    assert kinds == {"npz", "csv", "txt", "jsonl", "speeches", "state", "model"}


@pytest.mark.parametrize("name", sorted(cases.DATA))
def test_bad_data_file_is_refused_by_run(tmp_path, tiny_config, brickwork_cli, name):
    cli = brickwork_cli
    case = cases.DATA[name]
    tiny_config["data"] = case.write(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config))
    before = sorted(tmp_path.rglob("*"))
    r = cli("--runs-dir", str(tmp_path / "runs"), "run", str(cfg), "--no-progress", fresh_process=name in SUBPROCESS)
    assert_one_line_refusal(r, case.expected)
    assert not [p for p in sorted(tmp_path.rglob("*")) if p not in before]  # not even the store: no run exists


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished run over seeds 0 and 1 of a nested MLP, turned back into one that is
    interrupted before its train stage ended (so ``--resume`` reads the training state)."""
    runs = tmp_path_factory.mktemp("runs")
    cfg = {
        "name": "bad-files",
        "seed": 0,
        "seeds": [0, 1],
        "threads": 1,
        "data": {"name": "digits"},
        "models": {"sn": {"name": "nested_mlp", "width": 16, "depth": 2}},
        "stages": [{"stage": "train", "epochs": 2, "lr": 0.01}],
    }
    rec = execute(validate(cfg), RunStore(runs), progress=False, echo=lambda s: None)
    for seed in (0, 1):
        write_json(rec.dir / "sn" / f"seed-{seed}" / "progress.json", {"done": 0})
    return runs, rec


@pytest.mark.parametrize("name", sorted(cases.CHECKPOINT))
def test_bad_checkpoint_is_refused(trained, tmp_path, brickwork_cli, name):
    cli = brickwork_cli
    runs, rec = trained
    case = cases.CHECKPOINT[name]
    vdir, other = rec.dir / "sn" / "seed-0", rec.dir / "sn" / "seed-1"
    backup = tmp_path / "backup"
    shutil.copytree(vdir, backup)
    try:
        case.spoil(vdir, other)
        spoiled = {p.name: p.read_bytes() for p in vdir.iterdir()}
        RunStore(runs).update(rec.id, status="interrupted")
        if case.verb == "resume":
            r = cli(
                "--runs-dir", str(runs), "run", "--resume", rec.id, "--no-progress", fresh_process=name in SUBPROCESS
            )
        else:
            r = cli(
                "--runs-dir",
                str(runs),
                "slice",
                rec.id,
                "--width",
                "0.5",
                "--seed",
                "0",
                fresh_process=name in SUBPROCESS,
            )
        assert_one_line_refusal(r, case.expected)
        assert {p.name: p.read_bytes() for p in vdir.iterdir()} == spoiled  # nothing written or rolled over
        assert RunStore(runs).get(rec.id).status != "completed"  # a failure is never recorded as success
    finally:
        shutil.rmtree(vdir)
        shutil.copytree(backup, vdir)


def test_the_undamaged_run_resumes_with_legacy_checkpoints(trained, brickwork_cli):
    cli = brickwork_cli
    # The control: the same run, with nothing spoiled, resumes and completes; seed 0's files are
    # turned into ones written before the metadata hash and the seed binding (format 1), which
    # must still resume, as runs made before this change do.
    runs, rec = trained
    vdir = rec.dir / "sn" / "seed-0"
    _make_legacy(vdir / f"{cases.TRAIN_STATE}.json")
    RunStore(runs).update(rec.id, status="interrupted")
    r = cli("--runs-dir", str(runs), "run", "--resume", rec.id, "--no-progress", fresh_process=True)
    assert r.returncode == 0, r.stderr
    assert RunStore(runs).get(rec.id).status == "completed"
    _make_legacy(vdir / f"{cases.MODEL}.json")  # the model checkpoint the resume wrote
    r = cli("--runs-dir", str(runs), "slice", rec.id, "--width", "0.5", "--seed", "0")
    assert r.returncode == 0, r.stderr


def _make_legacy(path: Path) -> None:
    """Rewrite a checkpoint's JSON as brickwork wrote it before format 2: no metadata hash, no binding."""
    meta = json.loads(path.read_text())
    meta.pop("meta_sha256")
    meta.pop("seed", None)
    meta["format"] = 1
    path.write_text(json.dumps(meta))
