"""Loading brickwork's built-in registry entries: the one import that reaches every layer.

An entry is registered when the module defining it is imported. The registry itself imports
nothing above it, so the layer that resolves names from configs (this one) imports every
module that registers built-ins before it looks a name up. ``brickwork.experiment`` calls
:func:`load_builtins` when it is imported, and the CLI calls it before any verb; code below
``experiment/`` that looks a name up imports the modules it needs itself (``load_dataset``
lives in ``brickwork.data``, whose package imports every dataset).

Example:
    >>> from brickwork.experiment.builtins import load_builtins
    >>> from brickwork.registry import REGISTRY
    >>> load_builtins()
    >>> "train" in REGISTRY.names("stage")
    True
"""

from __future__ import annotations

import importlib
import pkgutil

# The packages whose modules register entries, bottom layer first. Every module in them is
# imported (not only what the package re-exports), so a new module's entries cannot be missed.
BUILTIN_PACKAGES = (
    "brickwork.nn",
    "brickwork.data",
    "brickwork.models",
    "brickwork.train",
    "brickwork.ops",
    "brickwork.experiment.stages",
)

_loaded = False


def builtin_modules() -> list[str]:
    """Names of every module (packages included) of :data:`BUILTIN_PACKAGES`, sorted."""
    names = []
    for package in BUILTIN_PACKAGES:
        path = importlib.import_module(package).__path__
        names.append(package)
        names += [m.name for m in pkgutil.walk_packages(path, prefix=f"{package}.")]
    return sorted(set(names))


def load_builtins() -> None:
    """Import every module that registers a built-in entry (once; later calls return at once)."""
    global _loaded
    if _loaded:
        return
    for name in builtin_modules():
        importlib.import_module(name)
    _loaded = True  # only once all imported: a failed import is retried, not silently half-loaded
