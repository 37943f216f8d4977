"""Measurements of models and runs; nothing here changes a model."""

from brickwork.analysis.compute import Compute, FlopMeter, count_params, measure_compute, register_flops

__all__ = ["Compute", "FlopMeter", "count_params", "measure_compute", "register_flops"]
