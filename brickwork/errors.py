"""Errors a user can cause and fix.

Every error raised for bad input derives from :class:`BrickworkError`. The CLI prints its
message on one line (what, where, what was expected) and exits with status 2, without a
traceback; a bug inside brickwork is any other exception and keeps its traceback.
"""

from __future__ import annotations

import difflib
import reprlib
from collections.abc import Iterable

#: The most characters of a bad value (or key path) a message shows. A value can be huge (a
#: long string, a list of a million items, an expanded YAML alias): the message stays one line.
MAX_SHOWN = 200

_REPR = reprlib.Repr()  # Python 3.11's Repr takes no keyword arguments
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset = 3, 6, 8, 8, 8
_REPR.maxstring = _REPR.maxother = 160


def short_repr(value: object, limit: int = MAX_SHOWN) -> str:
    """``repr(value)`` bounded in time and length (nested containers and long strings elided)."""
    return shorten(_REPR.repr(value), limit)


def shorten(text: str, limit: int = MAX_SHOWN) -> str:
    """``text`` cut to ``limit`` characters, with a marker saying how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[: limit - 30]}... ({len(text):,} characters)"


class BrickworkError(Exception):
    """Bad input from the user: a config, a data file, a run id, a checkpoint."""


class ConfigError(BrickworkError):
    """A configuration value is malformed, unknown, of the wrong type or out of range.

    Args:
        path: dotted key path of the bad value, e.g. ``stages[0].epochs``.
        message: what is wrong and what was expected.
        value: the offending value, shown with a bounded ``repr`` (:func:`short_repr`).
        choices: valid names; the closest ones are suggested.
    """

    def __init__(
        self,
        path: str,
        message: str,
        value: object = None,
        choices: Iterable[str] | None = None,
        *,
        show_value: bool = True,
    ) -> None:
        path = shorten(path)
        text = f"{path}: {message}" if path else message
        if show_value:
            text += f" (got {short_repr(value)})"
        if choices is not None:
            close = close_matches(shorten(value) if isinstance(value, str) else short_repr(value), choices)
            if close:
                text += f"; did you mean {', '.join(repr(c) for c in close)}?"
        super().__init__(text)
        self.path = path


class DataError(BrickworkError):
    """A dataset is missing, unreadable or not of the expected shape."""


class CheckpointError(BrickworkError):
    """A checkpoint or run folder is missing, corrupt or does not match its model."""


class RunNotFoundError(BrickworkError):
    """No run in the store has the given id or name."""


def close_matches(word: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """The valid names nearest to ``word``, best first (for 'did you mean' hints)."""
    choices = list(choices)
    found = difflib.get_close_matches(word, choices, n=n, cutoff=0.5)
    # A prefix match ("mlp" for "mlp-tiny") is a good hint even when difflib's ratio is low.
    found += [c for c in choices if c.startswith(word) and c not in found][: n - len(found)]
    return found
