"""Weights in safetensors, metadata in JSON, written atomically and verified on load.

A checkpoint is two files side by side: ``NAME.safetensors`` (tensors only; safetensors
never unpickles, so loading a user's file cannot execute code) and ``NAME.json`` (the
metadata plus a SHA-256 of the tensor file, checked on load). Each file is written to a
temporary file in the same folder and moved into place with :func:`os.replace`.

The pair is committed by one rename, that of the JSON: new tensors first go to
``NAME.safetensors.pending``, then the JSON naming their hash replaces the old one, then the
pending file replaces ``NAME.safetensors``. A crash (or Ctrl-C) before the JSON rename leaves
the old checkpoint intact; one after it leaves a pending file whose hash the JSON names, and
:func:`load_tensors` rolls it forward. Either way a reader sees the old checkpoint or the
new one, never new tensors with old metadata.

The metadata is covered too: ``meta_sha256`` is the SHA-256 of the canonical JSON of every
other key, the tensor file's ``sha256`` among them, so an edited ``progress.epoch`` or learning
rate, or a JSON paired with other tensors, is refused on load. Files written before format 2
have no ``meta_sha256``; they still load (legacy), with only their tensor hash verified. A
caller binds a checkpoint to where it belongs (``expect={"seed": 0}`` on load, the same keys in
its metadata on save), which refuses another seed's files copied into place.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from brickwork.errors import CheckpointError
from brickwork.textio import dumps

FORMAT_VERSION = 2
LEGACY_FORMAT = 1  # before the metadata hash


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any) -> None:
    # Strict JSON (brickwork.textio): NaN/inf become null, tensors' numbers are numbers, others refused.
    atomic_write_text(path, dumps(obj, str(Path(path).name), indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def canonical_json(obj: Any) -> bytes:
    """One byte string per JSON value: sorted keys, no spaces, ASCII (what :func:`meta_digest` hashes)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str).encode()


def meta_digest(meta: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``meta`` without its ``meta_sha256`` key.

    ``meta`` is first round-tripped through JSON, so the digest computed on save (from Python
    values: tuples, paths, int keys) equals the one computed on load (from the parsed file).
    """
    plain = json.loads(dumps({k: v for k, v in meta.items() if k != "meta_sha256"}))  # as write_json writes it
    return hashlib.sha256(canonical_json(plain)).hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _os_error(e: SafetensorError, path: Path) -> Exception:
    """safetensors reports I/O failures (a full disk) as its own error, "... (os error 28)": as the
    ``OSError`` it is, naming the file, so the CLI says "no space left" in one line."""
    code = re.search(r"os error (\d+)", str(e))
    if code is None:
        return e
    n = int(code.group(1))
    return OSError(n, os.strerror(n), str(path))


def _pending(st_path: Path) -> Path:
    return st_path.with_name(st_path.name + ".pending")


def _paths(stem: str | Path) -> tuple[Path, Path]:
    """``(stem.safetensors, stem.json)``; a stem may contain dots (``slice-w0.25``) and may be
    given with either file's suffix."""
    stem = Path(stem)
    if stem.suffix in (".safetensors", ".json"):
        stem = stem.with_suffix("")
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def save_tensors(stem: str | Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None) -> Path:
    """Save ``tensors`` to ``stem.safetensors`` and ``meta`` (+ hash) to ``stem.json``.

    Tensors are made contiguous and detached; shared storage is copied (safetensors refuses
    aliased tensors, e.g. tied embeddings, so ties must be re-made by the model on load).

    Returns:
        The path of the ``.safetensors`` file.
    """
    st_path, meta_path = _paths(stem)
    st_path.parent.mkdir(parents=True, exist_ok=True)
    # Finish or remove what a killed save of this stem left (only in a folder this process owns).
    clean_stem(st_path, meta_path)
    flat = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(dir=st_path.parent, prefix=f".{st_path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        try:
            save_file(flat, tmp)
        except SafetensorError as e:
            raise _os_error(e, st_path) from None
        digest = _sha256(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, _pending(st_path))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _commit(st_path, meta_path, digest, meta)
    return st_path


def _commit(st_path: Path, meta_path: Path, digest: str, meta: Mapping[str, Any] | None) -> None:
    """The commit point: once the JSON names the new hash, the pending file is the checkpoint."""
    full = {**(meta or {}), "format": FORMAT_VERSION, "sha256": digest}
    full["meta_sha256"] = meta_digest(full)
    write_json(meta_path, full)
    os.replace(_pending(st_path), st_path)


def _write_and_hash(f: BinaryIO, h: Any, raw: Any) -> None:
    f.write(raw)
    h.update(raw)


# safetensors' dtype names (its format's header), for the streamed writer.
_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def save_tensors_streamed(
    stem: str | Path,
    layout: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    pieces: Iterable[tuple[str, torch.Tensor]],
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Save a checkpoint whose tensors arrive piece by piece, never all in memory at once.

    The same files and commit protocol as :func:`save_tensors` (tensors to a pending file, the
    JSON naming their hash is the commit, then the rename), but the safetensors file is written
    as the pieces come: its header is computed from ``layout`` first, then every piece is written
    and hashed right away, so the memory used is one piece, not the model (safetensors' own
    ``save_file`` takes every tensor at once). The file is standard safetensors: tensors in
    ``layout``'s order, the header padded with spaces to 8 bytes as ``save_file`` does.

    Args:
        stem: the checkpoint's path without suffix.
        layout: name -> (shape, dtype) of every tensor, in the order the pieces arrive.
        pieces: ``(name, values)`` in layout order; a tensor may come in several pieces (row
            chunks, in order) whose elements add up to its shape.
        meta: the metadata, as for :func:`save_tensors`.

    Raises:
        CheckpointError: a piece out of order, of the wrong dtype, or too many or too few elements.
    """
    st_path, meta_path = _paths(stem)
    st_path.parent.mkdir(parents=True, exist_ok=True)
    clean_stem(st_path, meta_path)
    header: dict[str, Any] = {}
    offset = 0
    for name, (shape, dtype) in layout.items():
        if dtype not in _ST_DTYPES:
            raise CheckpointError(f"{st_path}: tensor {name!r} has dtype {dtype}, which safetensors cannot store")
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    fd, tmp = tempfile.mkstemp(dir=st_path.parent, prefix=f".{st_path.name}.", suffix=".tmp")
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as f, ThreadPoolExecutor(1) as writer:
            for part in (len(head).to_bytes(8, "little"), head):
                f.write(part)
                h.update(part)
            order = list(layout)
            inflight: Future[None] | None = None
            idx, left = -1, 0  # the tensor being written, its elements still to come
            for name, values in pieces:
                if left == 0 and (idx < 0 or name != order[idx]) and idx + 1 < len(order):
                    idx += 1  # the next tensor starts
                    left = math.prod(layout[order[idx]][0])
                if idx < 0 or name != order[idx] or values.dtype != layout[name][1] or values.numel() > left:
                    want = order[idx] if idx >= 0 else "(no tensor)"
                    raise CheckpointError(f"{st_path}: a piece of {name!r} does not follow the layout (at {want!r})")
                left -= values.numel()
                raw = values.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
                # Writing and hashing release the GIL: done in a second thread while the next
                # piece is computed (one piece in flight, so memory stays one piece or two).
                if inflight is not None:
                    inflight.result()
                inflight = writer.submit(_write_and_hash, f, h, raw)
            if inflight is not None:
                inflight.result()
            if left or idx != len(order) - 1:
                raise CheckpointError(f"{st_path}: the pieces ended before the layout's last tensor")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, _pending(st_path))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _commit(st_path, meta_path, h.hexdigest(), meta)
    return st_path


def read_meta(stem: str | Path, *, verify: bool = True, expect: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The metadata of checkpoint ``stem`` (``stem.json``), checked before any tensor is read.

    Args:
        stem: the checkpoint's path without suffix.
        verify: check the metadata hash (format 2; legacy files have none).
        expect: keys the metadata must hold with these values (e.g. ``{"seed": 0}``), so that
            another run's or seed's files copied into place are refused. Legacy files may lack them.

    Raises:
        CheckpointError: missing, not a JSON object, no tensor hash, edited after it was written
            (the metadata hash does not match), or bound to other ``expect`` values.
    """
    _, meta_path = _paths(stem)
    meta = read_json(meta_path)
    if not isinstance(meta, dict):
        raise CheckpointError(
            f"{meta_path}: expected a JSON object of checkpoint metadata, got a JSON {type(meta).__name__}"
        )
    digest = meta.get("sha256")
    if not isinstance(digest, str) or len(digest) != 64:
        raise CheckpointError(f"{meta_path}: no SHA-256 of the tensor file (key 'sha256'); not a brickwork checkpoint")
    fmt = meta.get("format", LEGACY_FORMAT)
    legacy = "meta_sha256" not in meta
    if verify and legacy and fmt != LEGACY_FORMAT:
        raise CheckpointError(
            f"{meta_path}: format {fmt!r} but no metadata hash (key 'meta_sha256'); "
            "the metadata was changed after it was written"
        )
    if verify and not legacy and meta["meta_sha256"] != meta_digest(meta):
        raise CheckpointError(
            f"{meta_path}: the metadata does not match its SHA-256 (key 'meta_sha256'); "
            "it was changed after it was written (or belongs to other tensors)"
        )
    for key, want in (expect or {}).items():
        if key not in meta and legacy:
            continue  # a checkpoint from before bindings were recorded
        if meta.get(key) != want:
            raise CheckpointError(
                f"{meta_path}: {key}: saved {meta.get(key)!r}, expected {want!r}; "
                "these checkpoint files belong to another run, model or seed"
            )
    return meta


def load_tensors(
    stem: str | Path, *, verify: bool = True, expect: Mapping[str, Any] | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """Load a checkpoint written by :func:`save_tensors`, checking its hashes.

    Args:
        stem: the checkpoint's path without suffix.
        verify: check the tensor file's and the metadata's hash.
        expect: metadata values the checkpoint is bound to (see :func:`read_meta`).

    Raises:
        CheckpointError: a file is missing, the metadata is malformed, edited or bound to other
            values, or the tensor file does not match its hash.
    """
    st_path, meta_path = _paths(stem)
    meta = read_meta(stem, verify=verify, expect=expect)
    pending = _pending(st_path)
    rolled = pending.exists() and meta["sha256"] == _sha256(pending)
    if rolled:
        os.replace(pending, st_path)  # a save was cut off after its commit point: finish it
    if not st_path.exists():
        raise CheckpointError(f"{st_path}: weights file not found (metadata is at {meta_path})")
    if verify and not rolled and meta["sha256"] != _sha256(st_path):  # a rolled file was just hashed
        raise CheckpointError(
            f"{st_path}: contents do not match the SHA-256 recorded in {meta_path.name}; "
            "the file is corrupt or was changed after it was written"
        )
    try:
        tensors = load_file(str(st_path))
    except Exception as e:  # safetensors raises its own error types for malformed headers
        raise CheckpointError(f"{st_path}: not a readable safetensors file ({e})") from None
    return tensors, meta


# -- leftovers of killed saves ----------------------------------------------------------------
#
# Leftovers of saves that were killed: cleaned only where this process alone writes.
#
# An atomic write (:mod:`brickwork.persist`) goes through ``.NAME.XXXXXXXX.tmp`` and, for
# tensors, ``NAME.safetensors.pending``. A SIGKILL (or a full disk, or a power cut) in the
# middle leaves them behind, each as large as a checkpoint. They can only be removed safely
# where no live save could be using them: a folder this process has *claimed* with
# :func:`owned_folder`, which a run does while it holds its run folder's lock (no other process
# can be writing there). Elsewhere nothing is deleted.
#
# A pending file whose hash the JSON already names is not an orphan but the committed
# checkpoint, cut off before its last rename: it is rolled forward, never deleted.

_OWNED: list[Path] = []
_PENDING = ".safetensors.pending"


@contextmanager
def owned_folder(folder: str | Path) -> Iterator[None]:
    """Declare that, while inside, only this process writes under ``folder`` (it holds its lock)."""
    path = Path(folder).resolve()
    _OWNED.append(path)
    try:
        yield
    finally:
        _OWNED.remove(path)


def is_owned(path: str | Path) -> bool:
    """Whether ``path`` lies in a folder claimed with :func:`owned_folder`."""
    p = Path(path).resolve()
    return any(p == f or f in p.parents for f in _OWNED)


def _committed(pending: Path, meta_path: Path) -> bool | None:
    """Whether the JSON beside ``pending`` names its hash; None when the JSON cannot be read."""
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        return None
    return isinstance(meta, dict) and meta.get("sha256") == _sha256(pending)


def clean_stem(st_path: Path, meta_path: Path) -> int:
    """Finish or remove what killed saves of one checkpoint left; the count of files removed.

    Only in an owned folder: elsewhere a live save of another process could own the files.
    """
    if not is_owned(st_path.parent):
        return 0
    removed = 0
    pending = _pending(st_path)
    if pending.exists():
        committed = _committed(pending, meta_path)
        if committed:
            os.replace(pending, st_path)  # the save had passed its commit point: finish it
        elif committed is False:
            pending.unlink()
            removed += 1
    for name in (st_path.name, meta_path.name):
        for tmp in st_path.parent.glob(f".{glob.escape(name)}.*.tmp"):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def sweep(folder: str | Path) -> int:
    """Clean every leftover of a killed save under an owned ``folder``; the count removed."""
    root = Path(folder)
    if not is_owned(root):
        return 0
    removed = 0
    for pending in sorted(root.rglob(f"*{_PENDING}")):
        removed += clean_stem(*_paths(pending.with_name(pending.name[: -len(_PENDING)])))
    for tmp in root.rglob(".*.tmp"):  # atomic writes of any file: config, progress, report
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed
