"""Configuration schema, the pipeline of stages, the run store and reports.

This is the layer where names in configs become objects, so importing it loads every
built-in registry entry (:func:`~brickwork.experiment.builtins.load_builtins`): any module of
``experiment/`` (and every verb, which imports it) can resolve a name without loading them itself.
"""

from brickwork.experiment.build import build_model
from brickwork.experiment.builtins import load_builtins
from brickwork.experiment.config import RunConfig, Spec, load_config, validate
from brickwork.experiment.context import StageContext
from brickwork.experiment.pipeline import execute
from brickwork.experiment.store import RunRecord, RunStore

__all__ = [
    "RunConfig",
    "RunRecord",
    "RunStore",
    "Spec",
    "StageContext",
    "build_model",
    "execute",
    "load_builtins",
    "load_config",
    "validate",
]

# Last, once the names above are bound: the stage modules it imports use them.
load_builtins()
