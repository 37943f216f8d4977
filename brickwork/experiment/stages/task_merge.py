"""The ``task_merge`` stage: one start fine-tuned on two tasks (own heads), the bodies merged.

Typical config (a start pre-trained without either task's labels, then merged with every method,
hyper-parameters chosen on the tasks' validation splits)::

    data: {name: rotations, sources: [{name: mnist5k}, {name: fashion-mnist, limit_train: 10000}]}
    stages:
      - {stage: train, epochs: 5}
      - stage: task_merge
        tasks: [{name: mnist5k}, {name: fashion-mnist, limit_train: 10000}]
        data_seed: 0
        methods: [linear, task_arithmetic, ties, fisher, regmean]
        grid: {task_arithmetic: {scale: [0.5, 1.0]}, ties: {density: [0.1, 0.2]}}
        probe_epochs: 2
        epochs: 2
        lr: 0.0001
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Annotated, Any

import pydantic
import pydantic.dataclasses
import torch
from pydantic import Field
from torch import Tensor, nn

from brickwork.analysis.connectivity import evaluate_loss_accuracy
from brickwork.data import Dataset, load_dataset
from brickwork.data.batching import batches
from brickwork.data.sentences import token_batches
from brickwork.errors import BrickworkError, ConfigError
from brickwork.experiment.context import SplitName, StageContext
from brickwork.experiment.report import markdown_table as table
from brickwork.nn.stack import StackModel
from brickwork.ops.layerwise import set_trainable_
from brickwork.ops.merge import NEEDS_BASE, MergeMethod, fisher_diagonal, gram_matrices
from brickwork.ops.merge import merge as merge_models
from brickwork.ops.merge_grid import best_point, grid_points
from brickwork.persist import write_json
from brickwork.registry import Flatten, register
from brickwork.train.layerwise import train_phase
from brickwork.train.recipe import DEFAULT_TRAINING, TrainSettings, train_with

#: Per method, option name -> candidate values (``{ties: {density: [0.1, 0.2], scale: [1, 1.5]}}``).
Grid = dict[MergeMethod, dict[str, Annotated[list[Any], Field(min_length=1)]]]


@pydantic.dataclasses.dataclass(frozen=True, config=pydantic.ConfigDict(extra="forbid"))
class TaskMergePlan:
    """The tasks and merges of a ``task_merge`` stage (set flat in the stage's config).

    Attributes:
        other_data: a second task beside the run's data (same inputs and classes).
        tasks: instead, two dataset specs; the run's data only pre-trained the start.
        data_seed: seeds the splits of ``tasks`` (default: the variant's seed).
        methods: merge methods, each reported.
        options: per method, fixed merge options.
        grid: per method, option -> candidate values, chosen on validation.
    """

    other_data: dict[str, Any] | None = None
    tasks: Annotated[list[dict[str, Any]], Field(min_length=2, max_length=2)] | None = None
    data_seed: Annotated[int, Field(ge=0)] | None = None
    methods: Annotated[list[MergeMethod], Field(min_length=1)] = dataclasses.field(
        default_factory=lambda: ["task_arithmetic", "ties"]
    )
    options: dict[str, dict[str, Any]] | None = None
    grid: Grid | None = None

    def points(self) -> dict[MergeMethod, list[dict[str, Any]]]:
        """Per method, the options of every grid point (one point without a grid)."""
        return {
            m: grid_points(m, dict((self.options or {}).get(m, {})), (self.grid or {}).get(m, {}))
            for m in dict.fromkeys(self.methods)
        }

    def check(self, path: str = "") -> None:
        """One task source, ``data_seed`` only with ``tasks``, grids only for listed methods and known options.

        Raises:
            ConfigError: naming the key, e.g. ``stages[1].grid``.
        """

        def at(key: str) -> str:
            return f"{path}.{key}" if path else key

        if (self.other_data is None) == (self.tasks is None):
            raise ConfigError(
                at("tasks"), "give either other_data (a second task beside the run's data) or tasks (two)", self.tasks
            )
        if self.other_data is not None and self.data_seed is not None:
            raise ConfigError(
                at("data_seed"), "goes with tasks; with other_data the first task is the run's data", self.data_seed
            )
        extra = sorted(set(self.grid or {}) - set(self.methods))
        if extra:
            raise ConfigError(
                at("grid"), f"names method(s) {extra} that are not in methods {list(self.methods)}", extra
            )
        try:
            self.points()
        except BrickworkError as e:
            raise ConfigError(at("grid"), str(e), show_value=False) from None


DEFAULT_PLAN = TaskMergePlan()  # frozen; its check (at validation) requires other_data or tasks


def _classifier_slot(model: nn.Module) -> tuple[nn.Module, str]:
    """``(parent, attribute)`` of the last ``nn.Linear`` of ``model.head``: the layer that names the classes."""
    head = model.get_submodule("head")
    if isinstance(head, nn.Linear):
        return model, "head"
    linears = [name for name, m in head.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise BrickworkError(f"task_merge: the model's head ({type(head).__name__}) has no nn.Linear classifier")
    parent, _, attr = linears[-1].rpartition(".")
    return (head.get_submodule(parent) if parent else head), attr


def _classifier(model: nn.Module) -> nn.Linear:
    parent, attr = _classifier_slot(model)
    layer = getattr(parent, attr)
    assert isinstance(layer, nn.Linear)
    return layer


def _with_classifier(model: nn.Module, layer: nn.Linear) -> nn.Module:
    """A copy of ``model`` whose classifier is a copy of ``layer`` (the rest of the head, e.g. a
    pooling that shares the stem's padding mask, stays the model's own)."""
    out = copy.deepcopy(model)
    parent, attr = _classifier_slot(out)
    setattr(parent, attr, copy.deepcopy(layer))
    return out


def _classifier_keys(model: nn.Module) -> set[str]:
    layer = _classifier(model)
    return {n for n, p in model.named_parameters() if any(p is q for q in layer.parameters())}


def _task_batches(data: Dataset, samples: int, device: str) -> list[tuple[Tensor, Tensor]]:
    """Up to ``samples`` training rows of ``data`` as batches; token ids without padding (a Gram
    or a Fisher over padded positions would count tokens the encoder never attends to)."""
    x, y = data.train.x[:samples], data.train.y[:samples]
    if x.dtype == torch.long and x.dim() == 2:
        return [(a.to(device), b.to(device)) for a, b in token_batches(x, 64, y) if b is not None]
    return list(batches(x, y, 64, device=device))


@register("stage", "task_merge")
def task_merge(
    ctx: StageContext,
    /,
    plan: Annotated[TaskMergePlan, Flatten] = DEFAULT_PLAN,
    training: Annotated[TrainSettings, Flatten] = DEFAULT_TRAINING,
    probe_epochs: Annotated[int, Field(ge=0)] = 0,
    probe_lr: Annotated[float, Field(gt=0)] = 1e-2,
    samples: Annotated[int, Field(ge=1)] = 512,
    split: SplitName = "test",
    eval_batch_size: Annotated[int, Field(ge=1)] = 256,
) -> None:
    """Multi-task merging: this model fine-tuned on two tasks (separate heads), the bodies merged.

    The variant's model as it stands is the shared start (the "pre-trained" base). Either
    ``other_data`` (a dataset spec of the same input shape and classes): the tasks are this run's
    data and it, and each fine-tune starts from the start's own head; or ``tasks`` (two dataset
    specs): this run's data only pre-trained the start (e.g. ``rotations``, a task without
    either's labels), and each task gets a fresh classifier (the last ``nn.Linear`` of the head,
    sized to its classes, seeded by the run's seed). Each copy is fine-tuned (``training``: the
    ``train`` stage's keys); with ``probe_epochs`` its classifier is first trained alone at
    ``probe_lr`` (a linear probe, then the whole network: LP-FT, Kumar et al., 2022, which moves
    the features less than fine-tuning under a random head). The two fine-tuned models are merged
    with each of ``methods`` (``base``: the start, classifiers excluded; ``options``: per method,
    e.g. ``{ties: {density: 0.2}}``; Fisher / RegMean statistics from ``samples`` training rows of
    each model's own task); every task is evaluated with the merged stem and body and its own
    fine-tuned classifier. Reported: each task's accuracy normalised to its fine-tuned model,
    and their mean (Ilharco et al., 2023).

    ``grid`` (per method, option -> candidates) chooses a method's options on the tasks'
    **validation** splits: every point is merged and scored by its mean normalised validation
    accuracy, the best (the first of equals) is reported on ``split`` with its values; the test
    split never takes part in the choice. ``data_seed`` seeds the tasks' splits (default: the
    variant's seed; only with ``tasks``); give the run's ``seed`` when the start was pre-trained on the tasks'
    training images (``rotations``), so that no run seed's val or test images were seen there.
    The variant's own model is not changed; the rows are also written to ``stage<k>-task-merge.json``.
    """
    model = ctx.model
    if not isinstance(model, StackModel):
        raise BrickworkError(f"task_merge: needs a stack model with a head, not {type(model).__name__}")
    other_data, tasks, grid = plan.other_data, plan.tasks, plan.grid
    points = plan.points()
    seed = ctx.seed if plan.data_seed is None else plan.data_seed
    specs = [dict(s) for s in (tasks if tasks is not None else [other_data or {}])]
    loaded = []
    for i, raw in enumerate(specs):
        if "name" not in raw:
            raise BrickworkError(f"task_merge: task {i} needs a dataset name, e.g. {{name: fashion-mnist}}")
        loaded.append(load_dataset(raw.pop("name"), seed=seed, **raw))
    if tasks is None:
        loaded.insert(0, ctx.data)
    for d in loaded:
        if tuple(d.in_shape) != tuple(ctx.data.in_shape) or (tasks is None and d.num_classes != ctx.data.num_classes):
            raise BrickworkError(
                f"task_merge: {d.name} has inputs {tuple(d.in_shape)} and {d.num_classes} classes, "
                f"{ctx.data.name} {tuple(ctx.data.in_shape)} and {ctx.data.num_classes}; expected the same"
                + (" inputs" if tasks is not None else "")
            )
    a, b = loaded
    task_data = {a.name: a, (b.name if b.name != a.name else f"{b.name}-2"): b}
    start = copy.deepcopy(model).eval()
    tuned: dict[str, nn.Module] = {}
    for name, data in task_data.items():
        ft = copy.deepcopy(start)
        torch.manual_seed(ctx.seed)
        if tasks is not None:
            old = _classifier(ft)
            parent, attr = _classifier_slot(ft)
            setattr(parent, attr, nn.Linear(old.in_features, data.num_classes).to(old.weight.device))
        if probe_epochs:
            probe = dataclasses.replace(training, epochs=probe_epochs, lr=probe_lr)
            keys = sorted(_classifier_keys(ft))
            train_phase(
                ft, keys, data.train, data.val, probe, seed=ctx.seed, device=ctx.device,
                state_path=ctx.stage_path(f"probe-{name}"), progress=ctx.progress, desc=f"probe on {name}",
            )  # fmt: skip
            set_trainable_(ft, ["*"])
        train_with(
            ft,
            data.train,
            data.val,
            training,
            seed=ctx.seed,
            device=ctx.device,
            state_path=ctx.stage_path(f"finetune-{name}"),
            progress=ctx.progress,
            desc=f"fine-tune on {name}",
            log_dir=ctx.tensorboard_dir(f"finetune-{name}"),
        )
        tuned[name] = ft.eval()
    names = list(task_data)
    shared = _classifier(tuned[names[0]])  # one classifier in every input, so the merge sees one architecture
    inputs = [_with_classifier(m, shared) for m in tuned.values()]
    base = _with_classifier(start, shared)
    drop = _classifier_keys(inputs[0])

    def accuracy(m: nn.Module, n: str, part: str) -> float:
        return evaluate_loss_accuracy(m, getattr(task_data[n], part), eval_batch_size, ctx.device)[1]

    own: dict[str, dict[str, float]] = {
        part: {n: accuracy(m, n, part) for n, m in tuned.items()} for part in dict.fromkeys(("val", split))
    }
    rows: list[dict[str, Any]] = [{"method": "fine-tuned (each its own)", **{f"acc_{n}": own[split][n] for n in names}}]
    stats: dict[str, list[dict[str, Tensor]]] = {}
    for method, candidates in points.items():
        kw: dict[str, Any] = {"base": base} if method in NEEDS_BASE else {}
        if method in ("fisher", "regmean"):
            if method not in stats:
                estimate = fisher_diagonal if method == "fisher" else gram_matrices
                batches_of = {n: _task_batches(task_data[n], samples, ctx.device) for n in names}
                stats[method] = [
                    {k: v for k, v in estimate(tuned[n], batches_of[n]).items() if k not in drop} for n in names
                ]
            kw["statistics"] = stats[method]

        def normalised(
            point: dict[str, Any], part: str, method: MergeMethod = method, kw: dict[str, Any] = kw
        ) -> dict[str, float]:
            body = merge_models(inputs, method, **kw, **point)
            return {n: accuracy(_with_classifier(body, _classifier(tuned[n])), n, part) / own[part][n] for n in names}

        val = [normalised(p, "val") for p in candidates] if len(candidates) > 1 else []
        chosen = candidates[best_point([sum(v.values()) / len(v) for v in val])] if val else candidates[0]
        row: dict[str, Any] = {"method": method, "options": _shown(chosen)}
        if val:
            row["val_mean"] = max(sum(v.values()) / len(v) for v in val)
            row["searched"] = len(candidates)
        for n, norm in normalised(chosen, split).items():
            row[f"acc_{n}"], row[f"norm_{n}"] = norm * own[split][n], norm
            ctx.metrics[f"task_merge_{method}_normalised_{n}"] = row[f"norm_{n}"]
        row["norm_mean"] = sum(row[f"norm_{n}"] for n in names) / len(names)
        ctx.metrics[f"task_merge_{method}_normalised_mean"] = row["norm_mean"]
        for key in (grid or {}).get(method, {}):
            if isinstance(chosen[key], (int, float)) and not isinstance(chosen[key], bool):
                ctx.metrics[f"task_merge_{method}_chosen_{key}"] = chosen[key]
        rows.append(row)
    for n in names:
        ctx.metrics[f"task_merge_finetuned_accuracy_{n}"] = own[split][n]
    write_json(ctx.stage_path("task-merge").with_suffix(".json"), {"split": split, "rows": rows})
    how = f"{training.epochs} epoch(s) at lr {training.lr}"
    if probe_epochs:
        how = f"a linear probe of {probe_epochs} epoch(s) at lr {probe_lr}, then {how}"
    ctx.report.extend(
        [
            f"### Multi-task merge: fine-tuned on {' and '.join(names)}, bodies merged ({split})",
            f"Both fine-tuned from {ctx.label} as it stood ({how}), each with its own "
            + ("fresh " if tasks is not None else "")
            + "classifier; each task evaluated with the merged stem and body and its own classifier. `norm`: accuracy "
            "divided by that task's fine-tuned model's. Options of a method with a grid were chosen on the tasks' "
            "validation splits (`val mean`: the chosen point's mean normalised validation accuracy).",
            table(
                rows,
                [
                    ("method", "method", "{}"),
                    ("options", "options", "{}"),
                    *[(f"acc_{n}", f"acc {n}", "{:.4f}") for n in names],
                    *[(f"norm_{n}", f"norm {n}", "{:.3f}") for n in names],
                    ("norm_mean", "mean norm", "{:.3f}"),
                    ("val_mean", "val mean", "{:.3f}"),
                ],
            ),
        ]
    )


def _shown(options: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in options.items()) or "defaults"
