"""Merging safetensors checkpoints tensor by tensor, so memory does not grow with the number of models.

:func:`merge_files` runs the engine of :mod:`brickwork.ops.merge_engine` over :class:`FileSource`s:
each file is opened once for the whole merge (its header parsed once), and every read is one
positioned read (``os.preadv``) of one row chunk of one tensor into a fresh buffer; nothing is
memory-mapped, so the pages read do not stay resident and the resident memory is a few chunks
per model: each merged chunk goes to disk as soon as it is computed
(:func:`brickwork.persist.save_tensors_streamed`, atomic and hashed as every checkpoint), so
not even the output is held whole. Same chunks, same float64 arithmetic: a streaming merge is
bit-identical to the in-memory one.

The data-driven methods take precomputed statistics as files too (``statistics``: one
safetensors file per model of diagonal Fishers or Gram matrices, e.g. written with
``save_tensors`` from :func:`~brickwork.ops.merge.fisher_diagonal` or
:func:`~brickwork.ops.merge.gram_matrices`); estimating them needs the models in memory.

The metadata records the method, its options and every input's SHA-256 (the recorded one of a
brickwork checkpoint, verified against the file unless ``verify=False``); the model spec and
data shapes of the first input's metadata are carried over, so the result loads with
:func:`brickwork.experiment.build.load`. An existing output is never overwritten.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from brickwork.errors import BrickworkError, CheckpointError
from brickwork.ops.merge import check_merge, make_options
from brickwork.ops.merge_engine import CHUNK, MergeMethod, merge_pieces
from brickwork.persist import _ST_DTYPES, _sha256, read_meta, save_tensors_streamed  # the one file hash

_DTYPES = {name: dtype for dtype, name in _ST_DTYPES.items()}  # safetensors' header names -> torch
_CARRIED = ("model", "data", "structure", "extra_state")  # what experiment.build needs to rebuild


def tensor_path(path: str | Path) -> Path:
    """``path`` as a ``.safetensors`` file (a checkpoint stem may be given)."""
    p = Path(path)
    return p if p.suffix == ".safetensors" else p.with_name(p.name + ".safetensors")


class FileSource:
    """A :class:`~brickwork.ops.merge.Source` over one safetensors file, read with ``os.preadv``.

    The header is parsed once (by ``safetensors.safe_open``, which also validates it, and for the
    byte offsets). Inside ``with source:`` the file stays open and every read is one positioned
    read of the chunk's bytes into a fresh buffer (no mapping, so the pages read do not stay in
    the process's resident memory); outside it, each read opens and closes the file.
    """

    def __init__(self, path: str | Path, label: str | None = None) -> None:
        self.path = tensor_path(path)
        self.label = label or str(self.path)
        self._fd: int | None = None
        if not self.path.is_file():
            raise CheckpointError(f"merge: {self.path}: file not found")
        try:
            with safe_open(str(self.path), framework="pt") as f:
                self._info = {}
                for k in f.keys():
                    sl = f.get_slice(k)
                    self._info[k] = (tuple(sl.get_shape()), _DTYPES[sl.get_dtype()])
        except KeyError as e:
            raise CheckpointError(f"merge: {self.path}: unsupported tensor dtype {e}") from None
        except Exception as e:  # safetensors raises its own error types for malformed headers
            raise CheckpointError(f"merge: {self.path}: not a readable safetensors file ({e})") from None
        with open(self.path, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size))
        self._start = {k: 8 + size + int(v["data_offsets"][0]) for k, v in header.items() if k in self._info}

    def __enter__(self) -> FileSource:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def names(self) -> list[str]:
        return list(self._info)

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        return self._info[name]

    def read(self, name: str, rows: slice | None = None, out: Tensor | None = None) -> Tensor:
        shape, dtype = self._info[name]
        row = math.prod(shape[1:]) * dtype.itemsize
        first, stop = (0, shape[0] if shape else 1) if rows is None else (rows.start, rows.stop)
        out_shape = shape if rows is None else (stop - first, *shape[1:])
        if out is None:
            out = torch.empty(out_shape, dtype=dtype)  # not zero-filled (a bytearray would be): preadv fills it
        elif tuple(out.shape) != tuple(out_shape) or out.dtype != dtype or not out.is_contiguous():
            raise ValueError(
                f"merge: read of {name!r} into a {tuple(out.shape)} {out.dtype} buffer; need {out_shape} {dtype}"
            )
        if out.numel() == 0:
            return out
        buf = out.view(-1).view(torch.uint8).numpy().data  # a writable memoryview
        if self._fd is None:
            with self:
                self._pread(buf, self._start[name] + first * row)
        else:
            self._pread(buf, self._start[name] + first * row)
        return out

    def _pread(self, view: memoryview, offset: int) -> None:
        assert self._fd is not None
        done = 0
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got == 0:
                raise CheckpointError(f"merge: {self.path}: file ends inside tensor data (truncated?)")
            done += got


def describe_input(path: str | Path, verify: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """``({"path", "sha256"}, metadata)`` of one input; a brickwork checkpoint's recorded hash is checked."""
    st = tensor_path(path)
    meta_path = st.with_suffix(".json")
    meta: dict[str, Any] = read_meta(st.with_suffix("")) if meta_path.is_file() else {}
    recorded = meta.get("sha256")
    digest = _sha256(st) if verify or recorded is None else recorded
    if recorded is not None and digest != recorded:
        raise CheckpointError(f"merge: {st}: contents do not match the SHA-256 recorded in {meta_path.name}")
    return {"path": str(st), "sha256": digest}, meta


def merge_files(
    paths: Sequence[str | Path],
    out_stem: str | Path,
    method: MergeMethod = "linear",
    *,
    base: str | Path | None = None,
    statistics: Sequence[str | Path] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    verify: bool = True,
    chunk_elems: int = CHUNK,
    **options: Any,
) -> Path:
    """Merge safetensors checkpoints into ``out_stem`` (``.safetensors`` + ``.json``), streaming.

    Args:
        paths: the models' ``.safetensors`` files (or checkpoint stems).
        out_stem: the output checkpoint's path without suffix; refused if either file exists.
        method: as :func:`brickwork.ops.merge.merge`.
        base: the base model's file (task arithmetic, TIES, DARE, Model Stock).
        statistics: per model, a file of Fishers or Gram matrices (``fisher``, ``regmean``).
        overrides: module-path glob -> options.
        verify: hash every input (and check a brickwork checkpoint's recorded hash); with
            False, a recorded hash is trusted and only files without one are hashed.
        chunk_elems: elements per chunk read from each file.
        **options: fields of :class:`~brickwork.ops.merge.MergeOptions` (weights, density, ...).

    Returns:
        The path of the written ``.safetensors`` file.
    """
    opts = make_options(method, options)
    out_st = tensor_path(out_stem)
    out_json = out_st.with_suffix(".json")
    for p in (out_st, out_json):
        if p.exists():
            raise BrickworkError(f"merge: {p} exists; a merge writes a new checkpoint, never over one")
    models = [FileSource(p, f"model {i} ({tensor_path(p)})") for i, p in enumerate(paths)]
    base_src = None if base is None else FileSource(base, f"base ({tensor_path(base)})")
    stats = None if statistics is None else [FileSource(p, f"statistics {i}") for i, p in enumerate(statistics)]
    described = [describe_input(p, verify) for p in paths]
    first_meta = described[0][1]
    record = {
        "method": opts.method,
        "options": {k: v for k, v in dataclasses.asdict(opts).items() if k != "method"},
        "overrides": {k: dict(v) for k, v in (overrides or {}).items()},
        "inputs": [d[0] for d in described],
        "base": None if base is None else describe_input(base, verify)[0],
        "statistics": None if statistics is None else [describe_input(p, verify)[0] for p in statistics],
    }
    meta = {k: first_meta[k] for k in _CARRIED if k in first_meta}
    with contextlib.ExitStack() as files:  # each file opened once for the whole merge
        for src in [*models, *([base_src] if base_src else []), *(stats or [])]:
            files.enter_context(src)
        plans = check_merge(models, opts, base=base_src, statistics=stats, overrides=overrides)
        pieces = (
            (name, values)
            for name, o in plans.items()
            for _, values in merge_pieces(name, models, o, base=base_src, stats=stats, chunk_elems=chunk_elems)
        )
        layout = {name: models[0].info(name) for name in plans}
        return save_tensors_streamed(out_st.with_suffix(""), layout, pieces, {**meta, "merge": record})
