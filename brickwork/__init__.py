"""brickwork: modular neural networks from bricks, with the compute they really cost.

The subpackages are the public API, one layer each (``docs/api.md`` lists their names):

* :mod:`brickwork.nn`: bricks, torch-native modules usable alone;
* :mod:`brickwork.ops`: model-to-model operations (convert, sparsify, slice, stitch, ...);
* :mod:`brickwork.train`: the training loop, losses, optimizers, checkpoints;
* :mod:`brickwork.analysis`: measurements (compute, routing, modularity, Pareto fronts);
* :mod:`brickwork.data` and :mod:`brickwork.models`: datasets and reference models;
* :mod:`brickwork.experiment`: configs, the pipeline of stages, the run store, reports.

They are imported on first attribute access (``brickwork.nn``), not here, so that importing
one layer (``import brickwork.nn``) never loads the layers above it.

Example:
    >>> import brickwork
    >>> brickwork.__version__
    '0.1.0'
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

from brickwork._version import __version__

if TYPE_CHECKING:  # for type checkers and editors; at runtime __getattr__ imports on demand
    from brickwork import analysis, data, experiment, kernels, models, nn, ops, train

__all__ = ["__version__", "analysis", "data", "experiment", "kernels", "models", "nn", "ops", "train"]
SUBPACKAGES = frozenset(__all__) - {"__version__"}


def __getattr__(name: str) -> ModuleType:
    if name in SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(SUBPACKAGES))
