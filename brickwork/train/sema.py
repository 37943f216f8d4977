"""Continual learning over a task sequence with SEMA, and its two baselines (arXiv 2403.18886).

:func:`continual` trains a frozen backbone's adapters task after task, class-incrementally (one
head per task, the test answer taken over every class seen so far), and measures the accuracy on
every seen task after each one. Three methods share the loop:

- ``sema``: the first task gives every adapted layer one modular adapter. On each later task the
  layers are visited from shallow to deep; a layer whose descriptors all flag a shift (the
  smallest mean z-score of their reconstruction losses on the new task's inputs exceeds
  ``threshold``) gets a new adapter and router row, which train (with the new descriptor and the
  task's head) before the next layer is checked; every earlier adapter, descriptor and router row
  stays frozen. A task that triggers no expansion reuses the adapters and trains only its head.
- ``fixed``: one adapter per layer, shared by every task and trained on each in turn (a fixed
  set of adapters).
- ``finetune``: no adapters; the whole backbone is fine-tuned on each task in turn (sequential
  fine-tuning).

Training objective on a task: cross-entropy over that task's own classes (the logits of earlier
tasks' classes are left out, as the PILOT code base SEMA builds on does), plus each learning
descriptor's reconstruction loss. Training FLOPs of every phase are metered (``train.layerwise``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from brickwork.data.base import Dataset, Split
from brickwork.errors import BrickworkError
from brickwork.nn.modes import evaluating
from brickwork.nn.sema import Descriptor, SEMALayer, TaskHeads
from brickwork.nn.stack import StackModel, stack_of
from brickwork.train.layerwise import train_phase
from brickwork.train.loop import evaluate
from brickwork.train.losses import build_loss
from brickwork.train.recipe import TrainSettings

#: The continual-learning method: SEMA, a fixed set of adapters, or sequential fine-tuning.
Method = Literal["sema", "fixed", "finetune"]


@dataclass
class Task:
    """One task of a class-incremental sequence: its classes ``offset .. offset + count - 1``."""

    train: Split
    test: Split
    offset: int
    count: int


def class_tasks(data: Dataset, classes_per_task: int, samples_per_task: int | None = None) -> list[Task]:
    """Cut a classification dataset into tasks of ``classes_per_task`` consecutive classes.

    Raises:
        BrickworkError: not a classification dataset, or its classes do not divide into such tasks.
    """
    k = data.num_classes
    if data.task != "classify" or k % classes_per_task:
        raise BrickworkError(
            f"sema: {data.name} ({data.task}, {k} classes) does not split into tasks of {classes_per_task} classes"
        )
    tasks = []
    for offset in range(0, k, classes_per_task):
        parts = []
        for split in (data.train, data.test):
            keep = (split.y >= offset) & (split.y < offset + classes_per_task)
            parts.append(Split(split.x[keep], split.y[keep]))
        if samples_per_task is not None:
            parts[0] = Split(parts[0].x[:samples_per_task], parts[0].y[:samples_per_task])
        tasks.append(Task(parts[0], parts[1], offset, classes_per_task))
    return tasks


class TaskView(nn.Module):
    """The logits of classes ``offset .. offset + count - 1`` of ``model``: (B, ...) -> (B, count)."""

    def __init__(self, model: nn.Module, offset: int, count: int) -> None:
        super().__init__()
        self.model, self.offset, self.count = model, offset, count

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)[..., self.offset : self.offset + self.count]


def _head_dim(model: StackModel) -> int:
    proj = getattr(model.head, "proj", None)
    if not isinstance(proj, (nn.Linear, TaskHeads)):
        raise BrickworkError("sema: the backbone's head has no linear 'proj' to replace by task heads")
    return proj.in_features if isinstance(proj, nn.Linear) else proj.dim


def sema_model(
    backbone: nn.Module, rank: int, descriptor_rank: int, adapters: Sequence[int] = (), classes: Sequence[int] = ()
) -> StackModel:
    """A copy of stack model ``backbone`` with every body layer a :class:`SEMALayer` and task heads.

    Args:
        backbone: a stack model whose body layers map width D to D and whose head has a linear ``proj``.
        rank, descriptor_rank: adapter and autoencoder bottlenecks.
        adapters: adapters per body layer (default none); also how a recipe is replayed.
        classes: classes per task of the heads (default no task yet).
    """
    model = copy.deepcopy(stack_of(backbone))
    dim = _head_dim(model)
    counts = list(adapters) or [0] * len(model.body)
    for i, layer in enumerate(list(model.body.layers)):
        wrapped = SEMALayer(layer, dim, rank, descriptor_rank)
        for _ in range(counts[i]):
            wrapped.add_adapter()
        model.body.layers[i] = wrapped
    model.head.proj = TaskHeads(dim, list(classes))
    return model


def sema_like(model: nn.Module, recipe: Mapping[str, Any]) -> nn.Module:
    """Replay a ``sema`` recipe (``{"op": "sema", "rank", "descriptor_rank", "adapters", "classes"}``)."""
    return sema_model(model, int(recipe["rank"]), int(recipe["descriptor_rank"]), recipe["adapters"], recipe["classes"])


@dataclass
class ContinualResult:
    """What a continual run did.

    Attributes:
        model: the model after the last task.
        accuracy: ``accuracy[t][j]``: accuracy on task j's test split after training task t (j <= t),
            class-incremental (the answer taken over every class seen so far).
        task_accuracy: the same, task-aware (the answer taken over task j's own classes): what is
            left when the heads' bias towards recent tasks is taken out, i.e. the features' forgetting.
        adapters: adapters per body layer at the end.
        train_flops: training FLOPs of every phase, summed.
        decisions: one row per (task, layer) check of SEMA: ``task``, ``layer``, ``score``, ``expanded``.
    """

    model: StackModel
    accuracy: list[list[float]]
    adapters: list[int]
    train_flops: float
    decisions: list[dict[str, Any]] = field(default_factory=list)
    task_accuracy: list[list[float]] = field(default_factory=list)

    @property
    def average_accuracy(self) -> float:
        """Mean class-incremental accuracy over all tasks after the last one."""
        return average_accuracy(self.accuracy)

    @property
    def forgetting(self) -> float:
        """Mean class-incremental forgetting (:func:`forgetting`)."""
        return forgetting(self.accuracy)


def average_accuracy(accuracy: Sequence[Sequence[float]]) -> float:
    """Mean accuracy over all tasks after the last one, from an accuracy matrix ``[t][j]``."""
    return sum(accuracy[-1]) / len(accuracy[-1])


def forgetting(accuracy: Sequence[Sequence[float]]) -> float:
    """Mean over tasks but the last of (best accuracy before the last task - final accuracy)."""
    final, n = accuracy[-1], len(accuracy)
    drops = [max(accuracy[t][j] for t in range(j, n - 1)) - final[j] for j in range(n - 1)]
    return sum(drops) / len(drops) if drops else 0.0


def _inputs_at(model: StackModel, layer: int, x: Tensor, batch: int = 256) -> Tensor:
    """The input of body layer ``layer`` for inputs ``x``, in eval mode without gradients."""
    out = []
    with evaluating(model), torch.no_grad():
        for i in range(0, len(x), batch):
            h = model.stem(x[i : i + batch])
            for j in range(layer):
                h = model.body.layers[j](h)
            out.append(h)
    return torch.cat(out)


@dataclass
class _TaskTraining:
    """The training phases of one task: what they train on, how, where their states are kept."""

    model: StackModel
    view: TaskView
    local: Split
    settings: TrainSettings
    seed: int
    device: str
    state_dir: Path | None
    name: str
    progress: bool | None
    log_dir: Path | None = None
    phases: int = 0
    flops: float = 0.0

    def run(self, patterns: list[str], learning: Sequence[tuple[int, int]] = ()) -> None:
        """Train the parameters matching ``patterns``; the descriptors ``(layer, k)`` of ``learning``
        learn, then get their statistics from the task's inputs. Adds the phase's training FLOPs."""
        layers: list[SEMALayer] = list(self.model.body.layers)  # type: ignore[arg-type]
        descriptors: list[Descriptor] = [layers[i].descriptors[k] for i, k in learning]  # type: ignore[misc]
        for d in descriptors:
            d.learning = True
        empty = Split(self.local.x[:0], self.local.y[:0])  # no validation inside a task sequence
        where = None if self.state_dir is None else self.state_dir / f"{self.name}-phase{self.phases}"
        result = train_phase(
            self.view,
            patterns,
            self.local,
            empty,
            self.settings,
            seed=self.seed,
            device=self.device,
            state_path=where,
            progress=self.progress,
            desc=f"{self.name} phase {self.phases}",
            log_dir=None if self.log_dir is None else self.log_dir / f"phase{self.phases}",
        )
        for (i, _), d in zip(learning, descriptors, strict=True):
            d.learning = False
            with torch.no_grad():
                d.fit_statistics(d.losses(_inputs_at(self.model, i, self.local.x.to(self.device))))
        self.phases += 1
        self.flops += result.flops


def continual(
    backbone: nn.Module,
    tasks: Sequence[Task],
    method: Method,
    settings: TrainSettings,
    *,
    rank: int = 16,
    descriptor_rank: int = 16,
    threshold: float = 1.5,
    detect_samples: int = 512,
    seed: int = 0,
    device: str = "cpu",
    state_dir: Path | None = None,
    state_prefix: str = "",
    progress: bool | None = None,
    log_dir: Path | None = None,
) -> ContinualResult:
    """Learn ``tasks`` one after the other from ``backbone`` (copied) with ``method``.

    Args:
        backbone: the pre-trained stack model; frozen unless ``method`` is ``finetune``.
        tasks: the sequence (``class_tasks``).
        method: ``sema``, ``fixed`` or ``finetune``.
        settings: the training recipe of every phase.
        rank, descriptor_rank: adapter and autoencoder bottlenecks.
        threshold: SEMA expands a layer when its smallest mean descriptor z-score exceeds this.
        detect_samples: new-task training inputs the shift is measured on.
        seed: batch order of each phase (offset by the task).
        device: where the model and batches go.
        state_dir, state_prefix: each phase's training state is kept as
            ``state_dir / f"{state_prefix}task{t}-phase{p}"`` (resume continues inside the sequence).
        progress: progress bars.
        log_dir: TensorBoard folder; each phase's curves go to ``log_dir / f"task{t}" / f"phase{p}"``
            (None: no curves).
    """
    model = sema_model(backbone, rank, descriptor_rank).to(device)
    layers: list[SEMALayer] = list(model.body.layers)  # type: ignore[arg-type]
    loss = build_loss("cross_entropy")
    accuracy: list[list[float]] = []
    aware: list[list[float]] = []
    decisions: list[dict[str, Any]] = []
    flops = 0.0
    for t, task in enumerate(tasks):
        heads: TaskHeads = model.head.proj  # type: ignore[assignment]
        heads.add_task(task.count)
        view = TaskView(model, task.offset, task.count)
        local = Split(task.train.x, task.train.y - task.offset)
        head = f"model.head.proj.heads.{t}.*"
        name = f"{state_prefix}task{t}"
        curves = None if log_dir is None else log_dir / f"task{t}"
        job = _TaskTraining(model, view, local, settings, seed + 1_000 * t, device, state_dir, name, progress, curves)
        run = job.run

        if method == "finetune":
            run(["model.stem.*", "model.body.*", head])
        elif method == "fixed":
            if t == 0:
                for layer in layers:
                    layer.add_adapter()
            run(["model.body.layers.*.adapters.*", head])
        elif t == 0:
            new = [(i, layer.add_adapter()) for i, layer in enumerate(layers)]
            run([*(f"model.body.layers.{i}.*s.{k}.*" for i, k in new), head], new)
        else:
            expanded = False
            probe = local.x[:detect_samples].to(device)
            for i, layer in enumerate(layers):
                score = layer.shift_score(_inputs_at(model, i, probe))
                grow = score > threshold
                decisions.append({"task": t, "layer": i, "score": score, "expanded": grow})
                if grow:
                    k = layer.add_adapter()
                    run([f"model.body.layers.{i}.*s.{k}.*", f"model.body.layers.{i}.router.{k}.*", head], [(i, k)])
                    expanded = True
            if not expanded:
                run([head])
        flops += job.flops
        seen = task.offset + task.count
        row, own = [], []
        for earlier in tasks[: t + 1]:
            row.append(evaluate(TaskView(model, 0, seen), earlier.test, loss, device=device)["accuracy"])
            local_test = Split(earlier.test.x, earlier.test.y - earlier.offset)
            own_view = TaskView(model, earlier.offset, earlier.count)
            own.append(evaluate(own_view, local_test, loss, device=device)["accuracy"])
        accuracy.append(row)
        aware.append(own)
    for p in model.parameters():
        p.requires_grad_(True)
    return ContinualResult(model, accuracy, [len(layer) for layer in layers], flops, decisions, aware)
