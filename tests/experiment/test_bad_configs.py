"""The corpus of bad configs: each is refused by `validate` and by `run` with one line, exit 2, nothing written.

Every file in ``tests/corpus/configs/`` starts with ``# expect: <part of the message>`` and may
have ``# args: <override>`` (given after the config on the command line). Most cases call the
CLI's ``main`` in this process (torch is imported once); a few run the real console script.
The data files some configs name (a 4-column table, an npz archive without ``y``) are written
next to the configs in a temporary folder, which is also the working directory.
"""

from __future__ import annotations

import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import yaml

from brickwork.cli import main
from brickwork.errors import ConfigError
from brickwork.experiment.config import load_config
from brickwork.experiment.yaml_io import safe_load
from brickwork.nn.sparse import GroupLinear
from brickwork.nn.sparse.conv import GroupConv2d

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "corpus" / "configs"
CASES = sorted(CORPUS.glob("*.yaml"))
#: Cases also run through the real console script (a fresh process, exit status as a shell sees
#: it; ~2.4 s of start-up each): one refused while parsing, one while building the models for the
#: data. Every case runs in this process too.
SUBPROCESS = ["alias-bomb-seed", "cnn-on-table"]


def _header(path: Path) -> tuple[str, list[str]]:
    expect, args = "", []
    for line in path.read_text().splitlines()[:3]:
        if line.startswith("# expect: "):
            expect = line.removeprefix("# expect: ")
        elif line.startswith("# args: "):
            args = [line.removeprefix("# args: ")]
    assert expect, f"{path.name} has no '# expect:' line"
    return expect, args


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with the corpus and the data files it names; nothing else."""
    for f in CASES:
        shutil.copy(f, tmp_path / f.name)
    rng = np.random.default_rng(0)
    table = "a,b,c,d,label\n" + "".join(
        f"{x[0]},{x[1]},{x[2]},{x[3]},{i % 2}\n" for i, x in enumerate(rng.random((40, 4)))
    )
    (tmp_path / "four.csv").write_text(table)
    np.savez(tmp_path / "only-x.npz", x=rng.random((40, 4)).astype(np.float32))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _files(folder: Path) -> set[Path]:
    return {p.relative_to(folder) for p in folder.rglob("*")}


def _check_nothing_written(workdir: Path, before: set[Path]) -> None:
    """Nothing at all: no run folder, no store (not even an empty one), no stray file (a label like ../../x)."""
    new = _files(workdir) - before
    assert not new, new


def _check_refused(stderr: str, code: int, expect: str, name: str) -> None:
    lines = stderr.strip().splitlines()
    assert code == 2, f"{name}: exit {code}, stderr {stderr[-500:]!r}"
    assert len(lines) == 1, f"{name}: expected one line, got {len(lines)}: {stderr[-500:]!r}"
    assert "Traceback" not in stderr
    assert expect in lines[0], f"{name}: {expect!r} not in {lines[0]!r}"
    assert len(lines[0]) < 1000, f"{name}: a {len(lines[0])}-character message"


def test_corpus_is_large_and_headed():
    assert len(CASES) >= 60
    for f in CASES:
        _header(f)


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_both_verbs_refuse_with_one_line_and_write_nothing(
    path: Path, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    expect, args = _header(path)
    runs = workdir / "runs"
    before = _files(workdir)
    for verb in ("validate", "run"):
        code = main(["--runs-dir", str(runs), verb, path.name, *args])
        _check_refused(capsys.readouterr().err, code, expect, f"{verb} {path.name}")
    _check_nothing_written(workdir, before)


@pytest.mark.parametrize("name", SUBPROCESS)
def test_the_console_script_refuses(name: str, workdir: Path, brickwork_cli) -> None:
    path = CORPUS / f"{name}.yaml"
    expect, args = _header(path)
    before = _files(workdir)
    for verb in ("validate", "run"):
        r = brickwork_cli("--runs-dir", str(workdir / "runs"), verb, path.name, *args, cwd=workdir, fresh_process=True)
        _check_refused(r.stderr, r.returncode, expect, f"{verb} {name}")
    _check_nothing_written(workdir, before)


def test_shipped_configs_still_validate():
    for f in sorted((ROOT / "configs").rglob("*.yaml")):
        if f.parent.name == "data":  # they name examples/... files; test_config validates them where those are made
            continue
        load_config(f)  # the full check (models built for the data) runs in test_cli's validate tests


def test_alias_bomb_is_refused_while_parsing():
    # ~10^8 values once expanded; refused from the node graph, before any value is built or shown.
    text = (CORPUS / "alias-bomb-seed.yaml").read_text()
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError, match="expand to more than"):
            safe_load(text)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20  # the original cost 1.3 GB


def test_aliases_within_the_budget_still_load():
    text = "base: &b {name: mlp, width: 8}\nmodels: {a: *b, b: {<<: *b, width: 16}}\n"
    assert safe_load(text)["models"] == {"a": {"name": "mlp", "width": 8}, "b": {"name": "mlp", "width": 16}}
    assert safe_load(text) == yaml.safe_load(text)


def test_a_huge_value_is_shown_bounded():
    err = ConfigError("seed", "expected an integer", list(range(10**6)))
    assert len(str(err)) < 300 and "seed: expected an integer (got [0, 1, 2" in str(err)
    err = ConfigError("x" * 10_000, "bad", "y" * 10_000)
    assert len(str(err)) < 500


@pytest.mark.parametrize("layer", [GroupLinear, GroupConv2d])
def test_block_diagonal_refuses_a_density_it_cannot_give(layer: type) -> None:
    with pytest.raises(ValueError, match="block_diagonal"):
        layer(48, 48, groups=16, density=0.875, pattern="block_diagonal")
    assert layer(48, 48, groups=16, density=1 / 16, pattern="block_diagonal").density == pytest.approx(1 / 16)
