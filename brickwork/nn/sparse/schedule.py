"""When dynamic sparse training updates the topology, and how much it changes.

RigL (Evci et al., 2020, "Rigging the Lottery") updates every ΔT steps until T_end and swaps a
fraction ``α_t = α/2 (1 + cos(π t / T_end))`` of the active connections (cosine decay); SET
(Mocanu et al., 2018) swaps a constant fraction ζ = 0.3 after every training epoch but the
last. Both are this schedule with ``t`` measured as the fraction of training done (the loop's
``set_progress``); ``interval="epoch"`` updates at the end of each epoch (the loop's
``after_epoch`` hook, ``nn.hooks.after_optimizer_epoch``) instead of every ``interval`` steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Decay = Literal["cosine", "linear", "constant"]
Interval = int | Literal["epoch"]


@dataclass(frozen=True)
class PruneSchedule:
    """Prune-and-regrow schedule.

    Attributes:
        interval: optimizer steps between topology updates (RigL's ΔT), or ``"epoch"``: after
            every training epoch (SET).
        fraction: fraction of the active connections swapped at the start of training (α, ζ).
        decay: how that fraction falls with progress: RigL's ``cosine``, ``linear`` or ``constant`` (SET).
        stop: no update once this fraction of training is done (RigL's T_end / T, 0.75 there).
    """

    interval: Interval = 100
    fraction: float = 0.3
    decay: Decay = "cosine"
    stop: float = 0.75

    def __post_init__(self) -> None:
        if self.interval != "epoch" and (not isinstance(self.interval, int) or self.interval < 1):
            raise ValueError(f"PruneSchedule: interval must be >= 1, got {self.interval}")
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"PruneSchedule: fraction must lie in [0, 1], got {self.fraction}")
        if not 0.0 < self.stop <= 1.0:
            raise ValueError(f"PruneSchedule: stop must lie in (0, 1], got {self.stop}")

    def fraction_at(self, progress: float) -> float:
        """Fraction of active connections to swap at ``progress`` in [0, 1]; 0 from ``stop`` on."""
        if progress >= self.stop:
            return 0.0
        t = progress / self.stop
        if self.decay == "cosine":
            return self.fraction * 0.5 * (1.0 + math.cos(math.pi * t))
        if self.decay == "linear":
            return self.fraction * (1.0 - t)
        return self.fraction

    def due(self, step: int, progress: float) -> bool:
        """Whether the update after optimizer step ``step`` (1-based) changes the topology."""
        if self.interval == "epoch":
            return False
        return step > 0 and step % self.interval == 0 and progress < self.stop

    def due_at_epoch_end(self, progress: float) -> bool:
        """Whether the end of an epoch at ``progress`` changes the topology (``interval="epoch"``).

        The last epoch ends at progress 1.0, so with ``stop=1.0`` it is not followed by an update
        (SET's code rewires after every epoch but the last).
        """
        return self.interval == "epoch" and progress < self.stop
