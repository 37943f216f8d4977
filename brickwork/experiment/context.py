"""What a stage receives: the model variant it works on and where to put its results."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn

from brickwork.data.base import Dataset

#: The evaluation split a stage measures on, as a config names it.
SplitName = Literal["val", "test"]


@dataclass
class StageContext:
    """State shared by the stages of one model variant.

    Stages replace ``model`` when they transform it (convert, slice, merge, ...), add scalar
    ``metrics``, append ``history`` rows and add ``points`` (one per model or sub-model they
    measured: ``{"label", "accuracy", "flops", ...}``), which the report plots as accuracy
    against compute.

    Attributes:
        label: the variant's name in the config.
        dir: the variant's folder inside the run folder (checkpoints, stage outputs);
            ``<run>/<label>``, or ``<run>/<label>/seed-<s>`` when the config repeats seeds.
        run_dir: the run folder.
        seed: the seed of this variant's initialisation and training.
        resume: the run is being resumed; stages continue from their own saved state.
        structure: recipes of the structural changes made so far (``experiment.build``);
            a stage that replaces layers by others of a different shape appends one, so that
            the saved weights can be loaded into a rebuilt model.
        stage: index of the stage being run, so a stage's own files (``stage_path``) never
            collide with those of an earlier stage of the same kind.
        tensorboard: the variant's TensorBoard folder (``<run>/tb/<label>/seed<s>``), or None
            when the run logs no live curves (``log: {tensorboard: false}`` or no extra).
    """

    label: str
    model: nn.Module
    data: Dataset
    dir: Path
    run_dir: Path
    seed: int
    device: str
    aux_weights: dict[str, float] = field(default_factory=dict)
    resume: bool = False
    progress: bool | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    points: list[dict[str, Any]] = field(default_factory=list)
    report: list[str] = field(default_factory=list)
    structure: list[dict[str, Any]] = field(default_factory=list)
    stage: int = 0
    tensorboard: Path | None = None

    def stage_path(self, name: str) -> Path:
        """``<variant dir>/stage<k>-<name>``: a file stem private to the running stage."""
        return self.dir / f"stage{self.stage}-{name}"

    def tensorboard_dir(self, name: str) -> Path | None:
        """``<tensorboard>/stage<k>-<name>``: the running stage's TensorBoard folder, or None."""
        return None if self.tensorboard is None else self.tensorboard / f"stage{self.stage}-{name}"
