"""Leftovers of saves that were killed: cleaned only where this process alone writes.

An atomic write (:mod:`brickwork.persist`) goes through ``.NAME.XXXXXXXX.tmp`` and, for
tensors, ``NAME.safetensors.pending``. A SIGKILL (or a full disk, or a power cut) in the
middle leaves them behind, each as large as a checkpoint. They can only be removed safely
where no live save could be using them: a folder this process has *claimed* with
:func:`owned_folder`, which a run does while it holds its run folder's lock (no other process
can be writing there). Elsewhere nothing is deleted.

A pending file whose hash the JSON already names is not an orphan but the committed
checkpoint, cut off before its last rename: it is rolled forward, never deleted.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
    from brickwork.persist import _sha256  # persist imports this module for its save hook

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
    pending = st_path.with_name(st_path.name + ".pending")
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
        stem = pending.with_name(pending.name[: -len(_PENDING)])
        removed += clean_stem(stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json"))
    for tmp in root.rglob(".*.tmp"):  # atomic writes of any file: config, progress, report
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed
