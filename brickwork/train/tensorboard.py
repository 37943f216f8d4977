"""Live training curves: TensorBoard event files through ``torch.utils.tensorboard`` (optional).

The ``tensorboard`` extra (``pip install 'brickwork[tensorboard]'``) provides the event-file
writer; without it nothing is written and runs work as before. A run writes one folder per
model variant and seed (``<run>/tb/<variant>/seed<k>``), and inside it one folder per
training or evaluation (``stage0-train``, ``stage1-evaluate``, ...), so that
``tensorboard --logdir runs/`` overlays the same tag across runs, variants and seeds.

Steps are optimizer steps from 1 over one training (``fit``). A resumed training opens its
writer with ``purge_step`` at the first step it redoes: TensorBoard's readers drop the events
the interrupted process wrote from that step on, so no step is shown twice. Under ``torchrun``
rank 0 alone writes.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

from torch import nn

from brickwork.analysis.routing import routing_summary
from brickwork.distributed.process_group import current

#: What a run says once when the extra is missing.
NEEDS_EXTRA = "live training curves (TensorBoard) need the optional extra: pip install 'brickwork[tensorboard]'"


_SAID: list[bool] = []


def say_once() -> bool:
    """True the first time it is called in this process: say :data:`NEEDS_EXTRA` only once."""
    first = not _SAID
    _SAID.append(True)
    return first


def available() -> bool:
    """Whether the ``tensorboard`` package (the event-file writer's backend) is installed."""
    return importlib.util.find_spec("tensorboard") is not None


class ScalarWriter:
    """Scalars of one training or evaluation into one TensorBoard folder.

    Args:
        log_dir: the folder (created).
        purge_step: events already there at this step or later are dropped by readers
            (``SummaryWriter(purge_step=...)``): the steps a resumed training redoes.
    """

    def __init__(self, log_dir: Path, purge_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer: Any = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def scalars(self, step: int, values: dict[str, float], section: str) -> None:
        """Write ``values`` at ``step`` as tags ``<section>/<name>`` (non-finite values skipped)."""
        for name, value in values.items():
            if math.isfinite(value):
                self._writer.add_scalar(f"{section}/{name}", value, global_step=step)

    def close(self) -> None:
        self._writer.close()


def open_writer(log_dir: Path | None, purge_step: int = 0) -> ScalarWriter | None:
    """A :class:`ScalarWriter` for ``log_dir``; None when not logging (no folder given, the extra
    is not installed, or this process is not rank 0)."""
    if log_dir is None or not available() or not current().is_main:
        return None
    return ScalarWriter(log_dir, purge_step)


def write_scalars(log_dir: Path | None, values: dict[str, float], section: str, step: int = 0) -> None:
    """Write one set of scalars (an evaluation's) to ``log_dir``, replacing an earlier attempt's."""
    writer = open_writer(log_dir, purge_step=step)
    if writer is not None:
        writer.scalars(step, values, section)
        writer.close()


def routing_scalars(model: nn.Module) -> dict[str, float]:
    """Per routed layer of ``model``'s latest forward: ``<path>/imbalance`` (max / mean expert
    load), ``<path>/dropped_fraction`` (assignments over capacity) and ``<path>/entropy`` (mean
    router entropy, nats; routers with probabilities only). Empty for a model without routing."""
    out: dict[str, float] = {}
    for path, st in routing_summary(model).items():
        out[f"{path}/imbalance"] = st.imbalance
        out[f"{path}/dropped_fraction"] = st.drop_rate
        if st.entropy is not None:
            out[f"{path}/entropy"] = st.entropy
    return out
