"""Kernels: dispatch between implementations of the few hot operations of dynamic bricks.

Bricks call these functions and never pick a backend themselves; the choice (and the
measurements behind it) lives here.
"""

from brickwork.kernels.glu import fused_glu
from brickwork.kernels.grouped import (
    GroupedBackend,
    choose_grouped_backend,
    grouped_linear,
    grouped_mm_supported,
)
from brickwork.kernels.malloc import tune_glibc_malloc

__all__ = [
    "GroupedBackend",
    "choose_grouped_backend",
    "fused_glu",
    "grouped_linear",
    "grouped_mm_supported",
    "tune_glibc_malloc",
]
