"""Annealing schedules from a start value to an end value over training progress in [0, 1]."""

from __future__ import annotations

import math
from typing import Literal

Schedule = Literal["linear", "cosine", "exponential"]


def anneal(start: float, end: float, progress: float, schedule: Schedule = "exponential") -> float:
    """The scheduled value at ``progress`` (0 = start of training, 1 = end; clamped).

    * ``linear``: ``start + (end - start) * p``;
    * ``cosine``: ``end + (start - end) * (1 + cos(pi p)) / 2`` (slow at both ends);
    * ``exponential``: ``start * (end / start) ** p`` (geometric; needs both > 0), the
      temperature decay commonly used for Gumbel-softmax annealing.
    """
    p = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        return start + (end - start) * p
    if schedule == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * p))
    if schedule == "exponential":
        if start <= 0 or end <= 0:
            raise ValueError("anneal: the exponential schedule needs positive start and end")
        return start * (end / start) ** p
    raise ValueError(f"anneal: unknown schedule {schedule!r}")
