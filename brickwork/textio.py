"""Text that brickwork reads from a user, and JSON that it writes: strict, with one-line refusals.

Reading: a config is UTF-8 text. A binary file or a UTF-16 one (a Windows editor's "Unicode")
is refused with what it looks like and what to do, instead of a ``UnicodeDecodeError``.

Writing: every JSON file and store column brickwork writes is strict JSON (``allow_nan=False``),
so any JSON reader, not only Python's, can read it. Values are converted where the meaning is
plain, and refused otherwise:

* a NaN or infinite float becomes ``null`` (JSON has no such numbers; "no value" is what a
  reader should see; a diverged training run fails before its metrics are written at all);
* a one-element tensor or NumPy array and a NumPy scalar become the Python number they hold;
* a tuple becomes a list and a path its string;
* anything else (a tensor of many elements, a module, an arbitrary object) is refused with
  :class:`JSONValueError`, naming the key path of the value, before anything is written.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path, PurePath
from typing import Any

from brickwork.errors import BrickworkError

_BOMS = {b"\xff\xfe": "UTF-16 (little-endian)", b"\xfe\xff": "UTF-16 (big-endian)"}


class NotTextError(BrickworkError):
    """A file that should be UTF-8 text is binary or in another encoding."""


class JSONValueError(BrickworkError):
    """A value to be written as JSON has no JSON form (e.g. a tensor of many elements)."""


def read_utf8(path: str | PurePath) -> str:
    """The text of ``path``, which must be UTF-8 (a UTF-8 byte-order mark is allowed and dropped).

    Raises:
        NotTextError: the file holds NUL bytes (binary), starts with a UTF-16 byte-order mark,
            or is not valid UTF-8; the message says where and what to do.
        OSError: the file cannot be read.
    """
    data = Path(path).read_bytes()
    for bom, name in _BOMS.items():
        if data.startswith(bom):
            raise NotTextError(f"{path}: the file is {name} text; save it as UTF-8")
    nul = data.find(b"\x00")
    if nul >= 0:
        raise NotTextError(f"{path}: not a text file (NUL byte at offset {nul}); expected UTF-8 text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise NotTextError(
            f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}, line {line}); save it as UTF-8"
        ) from None


def to_json(obj: Any, where: str = "") -> Any:
    """``obj`` as plain JSON values (dicts, lists, str, int, finite float, bool, None); see the module.

    Args:
        obj: the value to convert.
        where: key path of ``obj`` inside what is written, for the refusal message.

    Raises:
        JSONValueError: a value has no JSON form.
    """
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                raise JSONValueError(f"{where or 'value'}: key {k!r} is a {type(k).__name__}; JSON keys are strings")
            out[k] = to_json(v, f"{where}.{k}" if where else str(k))
        return out
    if isinstance(obj, (list, tuple)):
        return [to_json(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, PurePath):
        return str(obj)
    if _is_array(obj):
        if obj.ndim == 0 or _size(obj) == 1:
            return to_json(obj.item(), where)
        shape = tuple(obj.shape)
        raise JSONValueError(
            f"{where or 'value'}: a {type(obj).__name__} of shape {shape} cannot be written as a JSON number; "
            "record a Python number (e.g. tensor.item()) or a list"
        )
    raise JSONValueError(
        f"{where or 'value'}: a {type(obj).__name__} has no JSON form; record numbers, strings, lists or mappings"
    )


def dumps(obj: Any, where: str = "", **kwargs: Any) -> str:
    """``json.dumps`` of :func:`to_json` of ``obj``, strict (``allow_nan=False``); kwargs go to it."""
    return json.dumps(to_json(obj, where), allow_nan=False, **kwargs)


def _is_array(obj: Any) -> bool:
    """A torch tensor, a NumPy array or a NumPy scalar (checked without importing either)."""
    torch, numpy = sys.modules.get("torch"), sys.modules.get("numpy")
    return (torch is not None and isinstance(obj, torch.Tensor)) or (
        numpy is not None and isinstance(obj, (numpy.ndarray, numpy.generic))
    )


def _size(obj: Any) -> int:
    size = obj.numel() if callable(getattr(obj, "numel", None)) else obj.size
    return int(size)
