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
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from brickwork.errors import CheckpointError

FORMAT_VERSION = 1


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
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    flat = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(dir=st_path.parent, prefix=f".{st_path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(flat, tmp)
        digest = _sha256(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, _pending(st_path))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # The commit point: once the JSON names the new hash, the pending file is the checkpoint.
    write_json(meta_path, {"format": FORMAT_VERSION, "sha256": digest, **(meta or {})})
    os.replace(_pending(st_path), st_path)
    return st_path


def load_tensors(stem: str | Path, *, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Load a checkpoint written by :func:`save_tensors`, checking its hash.

    Raises:
        CheckpointError: a file is missing, or the tensor file does not match its hash.
    """
    st_path, meta_path = _paths(stem)
    meta = read_json(meta_path)
    pending = _pending(st_path)
    if pending.exists() and meta.get("sha256") == _sha256(pending):
        os.replace(pending, st_path)  # a save was cut off after its commit point: finish it
    if not st_path.exists():
        raise CheckpointError(f"{st_path}: weights file not found (metadata is at {meta_path})")
    if verify and meta.get("sha256") != _sha256(st_path):
        raise CheckpointError(
            f"{st_path}: contents do not match the SHA-256 recorded in {meta_path.name}; "
            "the file is corrupt or was changed after it was written"
        )
    try:
        tensors = load_file(str(st_path))
    except Exception as e:  # safetensors raises its own error types for malformed headers
        raise CheckpointError(f"{st_path}: not a readable safetensors file ({e})") from None
    return tensors, meta
