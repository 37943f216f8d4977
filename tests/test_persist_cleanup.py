"""Leftovers of killed saves (``persist.clean_stem``, ``persist.sweep``), tested in-process.

A killed save leaves ``.NAME.XXXX.tmp`` files and ``NAME.safetensors.pending``. In a folder the
process owns they are removed, and only they; a pending file whose hash the JSON names is the
committed checkpoint and is rolled forward; a committed file is never touched; outside an owned
folder nothing is deleted. The CLI tests reach this code only in subprocesses, which mutmut's
per-test mapping does not see, hence these.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import brickwork.persist as persist
from brickwork.persist import clean_stem, is_owned, load_tensors, owned_folder, save_tensors, sweep


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _streamed(stem: Path, tensors, meta=None) -> Path:
    """``save_tensors_streamed`` of whole tensors (the same renames as ``save_tensors``)."""
    from brickwork.persist import save_tensors_streamed

    return save_tensors_streamed(
        stem, {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}, tensors.items(), meta
    )


def _killed_save(monkeypatch, stem: Path, tensors, at: int, meta=None, save=save_tensors) -> None:
    """A save of ``stem`` killed just before its ``at``-th rename (1: tensors -> pending, 2: the JSON,
    the commit point, 3: pending -> tensors), with the temporary files a SIGKILL would leave.

    The file the cut rename would have moved stays under its own name (``save_tensors`` removes
    its temporaries on an exception; a SIGKILL removes nothing).
    """
    real = persist.os.replace
    calls = {"n": 0}
    cut: list[tuple[Path, bytes]] = []

    def replace(src, dst):
        calls["n"] += 1
        if calls["n"] == at:
            cut.append((Path(src), Path(src).read_bytes()))
            raise KeyboardInterrupt
        real(src, dst)

    with monkeypatch.context() as m:
        m.setattr(persist.os, "replace", replace)
        with pytest.raises(KeyboardInterrupt):
            save(stem, tensors, meta)
    ((src, data),) = cut
    if not src.exists():  # removed by the exception handler, which a SIGKILL never runs
        src.write_bytes(data)


def test_a_killed_saves_leftovers_are_removed_and_only_those(tmp_path, monkeypatch):
    run = tmp_path / "run"
    save_tensors(run / "ck", {"a": torch.zeros(3)}, {"step": 1})
    save_tensors(run / "other", {"b": torch.ones(2)})
    (run / ".other.json.abc123.tmp").write_text("{}")  # another checkpoint's, left alone by clean_stem
    (run / "ck.safetensors.bak").write_text("user's")  # not a save's name
    _killed_save(monkeypatch, run / "ck", {"a": torch.ones(3)}, at=2, meta={"step": 2})  # pending + JSON tmp
    (run / ".ck.safetensors.x1.tmp").write_bytes(b"older kill")
    names = set(_files(run))
    assert {"ck.safetensors.pending", ".ck.safetensors.x1.tmp"} <= names
    assert sum(n.startswith(".ck.json.") and n.endswith(".tmp") for n in names) == 1  # the JSON's temporary
    before = _files(run)

    assert clean_stem(run / "ck.safetensors", run / "ck.json") == 0  # not owned: nothing deleted
    assert _files(run) == before
    with owned_folder(run):
        assert clean_stem(run / "ck.safetensors", run / "ck.json") == 3  # pending, two temporaries
    after = _files(run)
    gone = set(before) - set(after)
    assert gone == {n for n in before if n.startswith(".ck.") or n == "ck.safetensors.pending"} and len(gone) == 3
    assert after == {k: before[k] for k in after}  # everything else byte for byte
    back, meta = load_tensors(run / "ck")
    assert torch.equal(back["a"], torch.zeros(3)) and meta["step"] == 1  # the old checkpoint


def test_a_pending_file_the_json_names_is_rolled_forward_not_deleted(tmp_path, monkeypatch):
    save_tensors(tmp_path / "ck", {"a": torch.zeros(3)}, {"step": 1})
    _killed_save(monkeypatch, tmp_path / "ck", {"a": torch.ones(3)}, at=3, meta={"step": 2})  # past the commit
    assert (tmp_path / "ck.safetensors.pending").exists()
    with owned_folder(tmp_path):
        assert clean_stem(tmp_path / "ck.safetensors", tmp_path / "ck.json") == 0  # finished, not removed
    assert sorted(_files(tmp_path)) == ["ck.json", "ck.safetensors"]
    back, meta = load_tensors(tmp_path / "ck")
    assert torch.equal(back["a"], torch.ones(3)) and meta["step"] == 2


@pytest.mark.parametrize(
    "json_text, kept",
    [
        (None, False),  # no JSON at all: the pending file is an orphan
        ("[]", False),  # a JSON that is not metadata names no hash
        ('{"sha256": "' + "0" * 64 + '"}', False),  # another hash
        ("{not json", True),  # unreadable: it cannot be told whether the save had committed
    ],
    ids=["no-json", "json-list", "other-hash", "unreadable"],
)
def test_a_pending_file_is_removed_only_when_the_json_shows_it_uncommitted(tmp_path, json_text, kept):
    save_tensors(tmp_path / "ck", {"a": torch.zeros(3)})
    (tmp_path / "ck.safetensors").rename(tmp_path / "ck.safetensors.pending")  # its hash is the JSON's
    if json_text is None:
        (tmp_path / "ck.json").unlink()
    else:
        (tmp_path / "ck.json").write_text(json_text)
    pending = (tmp_path / "ck.safetensors.pending").read_bytes()
    with owned_folder(tmp_path):
        assert clean_stem(tmp_path / "ck.safetensors", tmp_path / "ck.json") == (0 if kept else 1)
    assert (tmp_path / "ck.safetensors.pending").exists() == kept and not (tmp_path / "ck.safetensors").exists()
    if kept:
        assert (tmp_path / "ck.safetensors.pending").read_bytes() == pending


def test_the_next_save_in_an_owned_folder_cleans_what_a_killed_save_left(tmp_path, monkeypatch):
    save_tensors(tmp_path / "ck", {"a": torch.zeros(3)})
    _killed_save(monkeypatch, tmp_path / "ck", {"a": torch.ones(3)}, at=1)  # the tensors' temporary
    assert any(n.startswith(".ck.safetensors.") for n in _files(tmp_path))
    with owned_folder(tmp_path):
        save_tensors(tmp_path / "ck", {"a": torch.full((3,), 2.0)})
    assert sorted(_files(tmp_path)) == ["ck.json", "ck.safetensors"]
    assert torch.equal(load_tensors(tmp_path / "ck")[0]["a"], torch.full((3,), 2.0))


def test_sweep_cleans_a_whole_owned_tree_and_nothing_committed(tmp_path, monkeypatch):
    run = tmp_path / "run"
    save_tensors(run / "ck", {"a": torch.zeros(3)})
    save_tensors(run / "seed0" / "state", {"a": torch.zeros(2)})
    save_tensors(run / "seed1" / "state", {"a": torch.zeros(2)})
    save_tensors(run / "seed1" / "best", {"a": torch.zeros(2)})
    _killed_save(monkeypatch, run / "seed0" / "state", {"a": torch.ones(2)}, at=2)  # pending + JSON tmp
    _killed_save(monkeypatch, run / "seed1" / "state", {"a": torch.ones(2)}, at=2)  # pending + JSON tmp
    _killed_save(monkeypatch, run / "seed1" / "best", {"a": torch.ones(2)}, at=3)  # committed, to roll forward
    (run / ".config.yaml.k2.tmp").write_text("a: 1")  # an atomic write of any other file
    (run / "seed0" / ".progress.json.k3.tmp").write_text("{}")
    (run / "notes.tmp").write_text("user's")  # not a hidden temporary: kept
    outside = tmp_path / "elsewhere"
    save_tensors(outside / "ck", {"a": torch.zeros(1)})
    _killed_save(monkeypatch, outside / "ck", {"a": torch.ones(1)}, at=2)
    before, before_outside = _files(run), _files(outside)

    assert sweep(run) == 0 and _files(run) == before  # not owned
    with owned_folder(run):
        assert is_owned(run / "seed1") and not is_owned(outside)
        assert sweep(run) == 6  # two pendings, two JSON temporaries, two other temporaries
        assert sweep(run) == 0
    assert not is_owned(run)  # the claim ends with the block
    assert _files(outside) == before_outside
    after = _files(run)
    assert sorted(after) == sorted(
        ["ck.json", "ck.safetensors", "notes.tmp"]
        + [
            f"{d}/{s}.{x}"
            for d, s in [("seed0", "state"), ("seed1", "state"), ("seed1", "best")]
            for x in ("json", "safetensors")
        ]
    )
    for name in after:
        if name != "seed1/best.safetensors":
            assert after[name] == before[name]  # committed files byte for byte
    assert torch.equal(load_tensors(run / "seed1" / "best")[0]["a"], torch.ones(2))  # rolled forward
    assert torch.equal(load_tensors(run / "seed0" / "state")[0]["a"], torch.zeros(2))


def test_ownership_covers_the_folder_and_below_only(tmp_path):
    run, sibling = tmp_path / "run", tmp_path / "run2"
    for d in (run / "sub", sibling):
        d.mkdir(parents=True)
    with owned_folder(run):
        assert is_owned(run) and is_owned(run / "sub") and is_owned(run / "sub" / "ck.safetensors")
        assert is_owned(tmp_path / "x" / ".." / "run")  # resolved
        assert not is_owned(sibling) and not is_owned(tmp_path) and not is_owned(sibling / "run")
        with owned_folder(sibling):
            assert is_owned(sibling)
        assert not is_owned(sibling)
    assert not is_owned(run)


@pytest.mark.parametrize("save", [save_tensors, _streamed], ids=["save_tensors", "streamed"])
def test_a_temporary_file_sits_beside_its_target_under_the_name_cleanup_finds(tmp_path, monkeypatch, save):
    # A kill just before any rename leaves the temporary where clean_stem looks: same folder
    # (os.replace is then an atomic rename on one file system), named .NAME.XXXX.tmp.
    for at in (1, 2):
        folder = tmp_path / f"cut{at}"
        save_tensors(folder / "ck", {"a": torch.zeros(2)})
        _killed_save(monkeypatch, folder / "ck", {"a": torch.ones(2)}, at=at, save=save)
        left = [n for n in _files(folder) if n not in ("ck.json", "ck.safetensors")]
        assert len(left) == at  # the temporary (and, cut at the JSON, the pending tensors)
        with owned_folder(folder):
            assert clean_stem(folder / "ck.safetensors", folder / "ck.json") == at
        assert sorted(_files(folder)) == ["ck.json", "ck.safetensors"]
        shutil.rmtree(folder)


def test_a_streamed_save_in_an_owned_folder_cleans_what_a_killed_save_left(tmp_path, monkeypatch):
    save_tensors(tmp_path / "ck", {"a": torch.zeros(3)})
    _killed_save(monkeypatch, tmp_path / "ck", {"a": torch.ones(3)}, at=2)  # pending + the JSON's temporary
    assert len(_files(tmp_path)) == 4
    with owned_folder(tmp_path):
        _streamed(tmp_path / "ck", {"a": torch.full((3,), 2.0)})
    assert sorted(_files(tmp_path)) == ["ck.json", "ck.safetensors"]
    assert torch.equal(load_tensors(tmp_path / "ck")[0]["a"], torch.full((3,), 2.0))
