"""A corpus of bad data and checkpoint files, written on demand (no binaries in git).

Each case has a name, a writer and the words its one-line refusal must contain.

- ``DATA``: ``write(folder) -> data section`` writes a bad ``.npz`` / ``.csv`` into ``folder``
  and returns the config's ``data:`` mapping pointing at it (met through ``brickwork run``).
- ``CHECKPOINT``: ``spoil(vdir, other)`` damages the checkpoint files of a trained variant
  folder ``vdir`` (``other``: the same variant's folder for another seed); ``verb`` says where a
  user meets it: ``resume`` (the training state, through ``run --resume``) or ``slice`` (the
  model checkpoint, through ``brickwork slice``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from brickwork.persist import load_tensors, save_tensors

TRAIN_STATE = "stage0-train_state"  # the train stage's resumable state in a variant folder
MODEL = "model"  # the variant's model checkpoint


@dataclass(frozen=True)
class DataCase:
    write: Callable[[Path], dict[str, Any]]
    expected: str


@dataclass(frozen=True)
class CheckpointCase:
    verb: Literal["resume", "slice"]
    spoil: Callable[[Path, Path], None]
    expected: str


# ------------------------------------------------------------------------------- data files


def _npz(**arrays: Any) -> Callable[[Path], dict[str, Any]]:
    def write(folder: Path) -> dict[str, Any]:
        path = folder / "bad.npz"
        np.savez(path, **arrays)
        return {"name": "npz", "path": str(path)}

    return write


def _raw(name: str, data: bytes, **args: Any) -> Callable[[Path], dict[str, Any]]:
    def write(folder: Path) -> dict[str, Any]:
        path = folder / name
        path.write_bytes(data)
        kind = "npz" if name.endswith((".npz", ".npy")) else "csv"
        return {"name": kind, "path": str(path), **args}

    return write


def _csv(text: str, label: str = "label") -> Callable[[Path], dict[str, Any]]:
    return _raw("bad.csv", text.encode(), label=label)


def _big_x() -> np.ndarray:
    x = np.zeros((20, 3))
    x[5, 2] = 1e300  # finite in float64, inf in float32
    return x


def _nan_x() -> np.ndarray:
    x = np.ones((20, 3))
    x[7, 0] = np.nan
    return x


def _npy_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, np.zeros((4, 2)))
    return buf.getvalue()


def _truncated_npz() -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, x=np.zeros((20, 3)), y=np.arange(20) % 2)
    return buf.getvalue()[:60]


Y20 = np.arange(20) % 2
DATA: dict[str, DataCase] = {
    "npz-missing-x": DataCase(_npz(features=np.zeros((20, 3)), y=Y20), "missing array(s) x"),
    "npz-missing-y": DataCase(_npz(x=np.zeros((20, 3))), "missing array(s) y"),
    "npz-x-one-dim": DataCase(_npz(x=np.zeros(20), y=Y20), "expected (N, ...)"),
    "npz-y-two-dims": DataCase(_npz(x=np.zeros((20, 3)), y=np.zeros((20, 2))), "expected (N,) class labels"),
    "npz-object-dtype": DataCase(_npz(x=np.array([{}] * 20, dtype=object), y=Y20), "cannot read arrays x/y"),
    "npz-complex-x": DataCase(_npz(x=np.zeros((20, 3), dtype=complex), y=Y20), "expected numbers"),
    "npz-1e300": DataCase(_npz(x=_big_x(), y=Y20), "x[5, 2] = 1e+300 is NaN, infinite or beyond float32"),
    "npz-nan": DataCase(_npz(x=_nan_x(), y=Y20), "x[7, 0] = nan"),
    "npz-label-collision": DataCase(
        _npz(x=np.zeros((20, 3)), y=np.where(Y20 == 1, 1e20, 1e20 + 2**40)), "beyond int64's range"
    ),
    "npz-fractional-labels": DataCase(_npz(x=np.zeros((20, 3)), y=Y20 + 0.5), "labels are fractional numbers"),
    "npz-nan-labels": DataCase(_npz(x=np.zeros((20, 3)), y=np.full(20, np.nan)), "labels contain NaN"),
    "npz-no-samples": DataCase(_npz(x=np.zeros((0, 3)), y=np.zeros(0)), "hold no samples"),
    "npz-length-mismatch": DataCase(_npz(x=np.zeros((20, 3)), y=np.zeros(19)), "x has 20 samples but y has 19"),
    "npz-empty-file": DataCase(_raw("bad.npz", b""), "data file is empty"),
    "npz-text-file": DataCase(_raw("bad.npz", b"x,y\n1,2\n"), "not an .npz archive"),
    "npz-single-npy": DataCase(_raw("bad.npy", _npy_bytes()), "is a single-array .npy file"),
    "npz-truncated": DataCase(_raw("bad.npz", _truncated_npz()), "not a readable .npz archive"),
    "csv-missing-label-column": DataCase(_csv("a,b,Label\n1,2,0\n", label="label"), "did you mean 'Label'"),
    "csv-ragged-row": DataCase(_csv("a,b,label\n1,2,0\n3,1\n"), "line 3 has 2 field(s); expected 3"),
    "csv-non-numeric-cell": DataCase(_csv("a,b,label\n1,2,0\n3,wide,1\n"), "column 'b': 'wide' is not a number"),
    "csv-non-utf8": DataCase(_raw("bad.csv", "a,label\n1,é\n".encode("latin-1"), label="label"), "not UTF-8"),
    "csv-utf16": DataCase(_raw("bad.csv", "a,label\n1,0\n".encode("utf-16"), label="label"), "not UTF-8"),
    "csv-empty-file": DataCase(_raw("bad.csv", b"", label="label"), "data file is empty"),
    "csv-header-only": DataCase(_csv("a,b,label\n"), "has a header but no data rows"),
    "csv-empty-label": DataCase(_csv("a,label\n1,0\n2,\n"), "line 3, column 'label': the label is empty"),
    "csv-1e300-cell": DataCase(_csv("a,label\n1,0\n1e300,1\n"), "line 3, column 'a': '1e300' is NaN, infinite"),
    "csv-label-beyond-int64": DataCase(_csv("a,label\n1,0\n2,100000000000000000000\n"), "beyond int64's range"),
}


# ------------------------------------------------------------- text of the user's own (txt, jsonl)


def _txt(files: dict[str, bytes], **args: Any) -> Callable[[Path], dict[str, Any]]:
    """A folder ``texts`` holding ``files`` (name -> bytes) as the ``txt`` dataset's ``path``."""

    def write(folder: Path) -> dict[str, Any]:
        path = folder / "texts"
        path.mkdir()
        for name, data in files.items():
            (path / name).write_bytes(data)
        return {"name": "txt", "path": str(path), **args}

    return write


def _txt_file(data: bytes) -> Callable[[Path], dict[str, Any]]:
    """One .txt file given as the ``txt`` dataset's ``path``, which names a folder."""

    def write(folder: Path) -> dict[str, Any]:
        path = folder / "notes.txt"
        path.write_bytes(data)
        return {"name": "txt", "path": str(path)}

    return write


def _jsonl(*lines: str, **args: Any) -> Callable[[Path], dict[str, Any]]:
    return _raw_jsonl("\n".join(lines).encode() + b"\n", **args)


def _raw_jsonl(data: bytes, **args: Any) -> Callable[[Path], dict[str, Any]]:
    def write(folder: Path) -> dict[str, Any]:
        path = folder / "bad.jsonl"
        path.write_bytes(data)
        return {"name": "jsonl", "path": str(path), **args}

    return write


def _rows(n: int, label: Callable[[int], Any] = lambda i: i % 2) -> list[str]:
    return [json.dumps({"text": f"sentence number {i}", "label": label(i)}) for i in range(n)]


PROSE = b"Who's there?\nNay, answer me: stand, and unfold yourself.\n" * 40  # 2,280 characters
DATA.update(
    {
        "npz-one-class": DataCase(_npz(x=np.zeros((20, 3)), y=np.full(20, 7)), "y holds one class only ('7')"),
        "csv-one-class": DataCase(_csv("a,label\n1,x\n2,x\n3,x\n"), "column 'label' holds one class only ('x')"),
        "txt-empty-folder": DataCase(_txt({"notes.md": b"not a .txt"}), "no .txt files in this folder"),
        "txt-non-utf8": DataCase(
            _txt({"a.txt": PROSE, "b.txt": "line one\ncaf\u00e9\n".encode("latin-1")}),
            "b.txt: line 2: not UTF-8 text (byte 0xe9",
        ),
        "txt-path-is-a-file": DataCase(_txt_file(PROSE), "not a folder; expected a folder of UTF-8"),
        "txt-only-blank-files": DataCase(_txt({"a.txt": b"\n\n", "b.txt": b"  "}), "hold no text"),
        "txt-too-short-for-val": DataCase(
            _txt({"a.txt": PROSE}, seq_len=512), "the val split has 228 characters, fewer than one window"
        ),
        "jsonl-not-json": DataCase(_jsonl(*_rows(3), "{'text': 'single quotes', 'label': 1}"), "line 4: not JSON"),
        "jsonl-not-an-object": DataCase(_jsonl(*_rows(2), '["a list", 1]'), "line 3: a JSON list, not a JSON object"),
        "jsonl-missing-text": DataCase(_jsonl(*_rows(2), '{"sentence": "hi", "label": 1}'), "line 3: no 'text' key"),
        "jsonl-missing-label": DataCase(_jsonl('{"text": "hi"}', *_rows(2)), "line 1: no 'label' key"),
        "jsonl-float-label": DataCase(_jsonl(*_rows(2), '{"text": "hi", "label": 0.5}'), "'label' is a number with a"),
        "jsonl-bool-label": DataCase(_jsonl(*_rows(2), '{"text": "hi", "label": true}'), "'label' is a boolean"),
        "jsonl-mixed-label-types": DataCase(
            _jsonl(*_rows(2), '{"text": "hi", "label": "pos"}'), "'label' is a string but line 1's is an integer"
        ),
        "jsonl-empty-text": DataCase(_jsonl(*_rows(2), '{"text": " ", "label": 1}'), "'text' is an empty string"),
        "jsonl-one-class": DataCase(_jsonl(*_rows(20, lambda i: "pos")), "'label' holds one class only ('pos')"),
        "jsonl-too-few-lines": DataCase(_jsonl(*_rows(4)), "4 line(s) are too few for the splits: the val split"),
        "jsonl-non-utf8": DataCase(
            _raw_jsonl('{"text": "ok", "label": 1}\n{"text": "caf\u00e9", "label": 0}\n'.encode("latin-1")),
            "line 2: not UTF-8 text",
        ),
        "jsonl-blank-lines-only": DataCase(_raw_jsonl(b"\n\n  \n"), "no JSON lines, only blank ones"),
    }
)


# ------------------------------------------------------------------------------- checkpoints


def _json_path(vdir: Path, stem: str) -> Path:
    return vdir / f"{stem}.json"


def _edit_json(
    stem: str, edit: Callable[[dict[str, Any]], object], legacy: bool = False
) -> Callable[[Path, Path], None]:
    """Edit the metadata; ``legacy`` also drops its hash (a pre-hash file), so only structure checks remain."""

    def spoil(vdir: Path, other: Path) -> None:
        path = _json_path(vdir, stem)
        meta = json.loads(path.read_text())
        edit(meta)
        if legacy:
            meta.pop("meta_sha256", None)
            meta["format"] = 1
        path.write_text(json.dumps(meta))

    return spoil


def _write_json_text(stem: str, text: str) -> Callable[[Path, Path], None]:
    def spoil(vdir: Path, other: Path) -> None:
        _json_path(vdir, stem).write_text(text)

    return spoil


def _truncate(stem: str) -> Callable[[Path, Path], None]:
    def spoil(vdir: Path, other: Path) -> None:
        path = vdir / f"{stem}.safetensors"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    return spoil


def _delete_tensors(stem: str) -> Callable[[Path, Path], None]:
    def spoil(vdir: Path, other: Path) -> None:
        (vdir / f"{stem}.safetensors").unlink()

    return spoil


def _other_seed(stem: str) -> Callable[[Path, Path], None]:
    """The other seed's pair (consistent in itself) copied into this seed's folder."""

    def spoil(vdir: Path, other: Path) -> None:
        for suffix in (".json", ".safetensors"):
            shutil.copyfile(other / f"{stem}{suffix}", vdir / f"{stem}{suffix}")

    return spoil


def _resave(stem: str, change: Callable[[str, torch.Tensor], torch.Tensor | None]) -> Callable[[Path, Path], None]:
    """Rewrite the tensors with ``change(name, tensor)`` applied to the first 2-d weight (or the
    first optimizer tensor when ``stem`` has one and the change asks for ``optim.``), hashes
    recomputed: a well-formed checkpoint whose contents are bad."""

    def spoil(vdir: Path, other: Path) -> None:
        tensors, meta = load_tensors(vdir / stem)
        for key in ("format", "sha256", "meta_sha256"):
            meta.pop(key)
        for name in sorted(tensors):
            new = change(name, tensors[name])
            if new is not None:
                tensors[name] = new
                break
        save_tensors(vdir / stem, tensors, meta)

    return spoil


def _weight(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[str, torch.Tensor], torch.Tensor | None]:
    def change(name: str, t: torch.Tensor) -> torch.Tensor | None:
        return fn(t) if t.ndim == 2 and t.is_floating_point() and not name.startswith("optim.") else None

    return change


def _nan_first(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


def _optim_nan(name: str, t: torch.Tensor) -> torch.Tensor | None:
    return _nan_first(t) if name.startswith("optim.") and t.ndim >= 1 and t.is_floating_point() else None


def _lr(meta: dict[str, Any]) -> None:
    group = meta["optimizer"]["param_groups"][0]
    group["initial_lr" if "initial_lr" in group else "lr"] = 10.0


def _width(meta: dict[str, Any]) -> None:
    meta["model"]["width"] = 32 if meta["model"].get("width") != 32 else 16


T, M = TRAIN_STATE, MODEL
CHECKPOINT: dict[str, CheckpointCase] = {
    "state-truncated-safetensors": CheckpointCase("resume", _truncate(T), "do not match the SHA-256"),
    "state-missing-safetensors": CheckpointCase("resume", _delete_tensors(T), "weights file not found"),
    "state-edited-epoch": CheckpointCase(
        "resume", _edit_json(T, lambda m: m["progress"].update(epoch=1)), "changed after it was written"
    ),
    "state-edited-lr": CheckpointCase("resume", _edit_json(T, _lr), "changed after it was written"),
    "state-other-seed": CheckpointCase("resume", _other_seed(T), "seed: saved 1, expected 0"),
    "state-bool-weights": CheckpointCase("resume", _resave(T, _weight(lambda t: t > 0)), "dtype torch.bool"),
    "state-int-weights": CheckpointCase("resume", _resave(T, _weight(lambda t: t.long())), "dtype torch.int64"),
    "state-nan-weights": CheckpointCase("resume", _resave(T, _weight(_nan_first)), "holds a NaN or infinite"),
    "state-nan-optimizer": CheckpointCase("resume", _resave(T, _optim_nan), "optimizer tensor"),
    "state-json-list": CheckpointCase("resume", _write_json_text(T, "[]"), "expected a JSON object"),
    "state-json-invalid": CheckpointCase("resume", _write_json_text(T, '{"format": 2, "sha'), "not valid JSON"),
    "state-no-optimizer": CheckpointCase(
        "resume", _edit_json(T, lambda m: m.pop("optimizer"), legacy=True), "no 'optimizer'"
    ),
    "state-epoch-wrong-type": CheckpointCase(
        "resume", _edit_json(T, lambda m: m["progress"].update(epoch="2"), legacy=True), "expected an integer"
    ),
    "state-groups-wrong-type": CheckpointCase(
        "resume", _edit_json(T, lambda m: m["optimizer"].update(param_groups={}), legacy=True), "expected a list"
    ),
    "model-truncated-safetensors": CheckpointCase("slice", _truncate(M), "do not match the SHA-256"),
    "model-edited-spec": CheckpointCase("slice", _edit_json(M, _width), "changed after it was written"),
    "model-bool-weights": CheckpointCase("slice", _resave(M, _weight(lambda t: t > 0)), "dtype torch.bool"),
    "model-nan-weights": CheckpointCase("slice", _resave(M, _weight(_nan_first)), "holds a NaN or infinite"),
    "model-json-list": CheckpointCase("slice", _write_json_text(M, "[]"), "expected a JSON object"),
    "model-no-model-key": CheckpointCase(
        "slice", _edit_json(M, lambda m: m.pop("model"), legacy=True), "no model spec"
    ),
}


# --------------------------------------------------- convention speeches (brickwork.data.speeches)


def _speeches(data: bytes) -> Callable[[Path], dict[str, Any]]:
    def write(folder: Path) -> dict[str, Any]:
        path = folder / "speeches.csv"
        path.write_bytes(data)
        return {"name": "convention-speeches", "path": str(path)}

    return write


SPEECH = "We will build a stronger economy for every family in this country."
DATA.update(
    {
        "speeches-missing-file": DataCase(
            lambda folder: {"name": "convention-speeches", "path": str(folder / "absent.csv")},
            "data.path: file not found",  # the config's path check, before the loader's own
        ),
        "speeches-missing-column": DataCase(
            _speeches(f"party,speech\ndemocrat,{SPEECH}\n".encode()), "no column(s) ['text']; expected a CSV"
        ),
        "speeches-unknown-party": DataCase(
            _speeches(f"party,text\ndemocrat,{SPEECH}\nwhig,{SPEECH}\n".encode()),
            "line 3: party 'whig'; expected one of ['democrat', 'republican']",
        ),
        "speeches-one-party": DataCase(
            _speeches(f"party,text\nrepublican,{SPEECH}\nrepublican,{SPEECH}\n".encode()),
            "speeches of ['republican'] only; expected both parties",
        ),
        "speeches-non-utf8": DataCase(
            _speeches("party,text\ndemocrat,caf\u00e9 society\n".encode("latin-1")), "not UTF-8 text (byte 0xe9"
        ),
        "speeches-split-without-sentences": DataCase(
            _speeches(f"party,text\ndemocrat,{SPEECH}\nrepublican,Thank you.\n".encode()),
            "split holds no sentence of 5 or more words",
        ),
    }
)
