"""Configuration schema, the pipeline of stages, the run store and reports."""

from brickwork.experiment.config import RunConfig, Spec, load_config, validate
from brickwork.experiment.context import StageContext
from brickwork.experiment.pipeline import build_model, execute
from brickwork.experiment.store import RunRecord, RunStore

__all__ = ["RunConfig", "RunRecord", "RunStore", "Spec", "StageContext", "build_model", "execute", "load_config",
           "validate"]
