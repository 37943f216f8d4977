"""Module-wise training inside a shared meta model: Deep Model Assembling and m2mKD.

One concept, two losses. A target model is divided into K modules (:func:`divide`, :func:`split_model`);
each module is trained in a small shared *meta model* (a shallow model of the same family, one
layer per module, pre-trained end to end first) with its own position replaced by the module
(:func:`meta_hybrid`); the trained modules are put together again (:func:`assemble`) and the whole is
fine-tuned end to end.

* **Deep Model Assembling** (Ni et al., 2023, arXiv 2212.04129; code LeapLabTHU/Deep-Incubation):
  the module is trained on the task loss (phases PT, MT, FT of ``main.py``).
  :func:`deep_model_assembling`.
* **m2mKD** (Lo et al., 2024, arXiv 2402.16918; code kamanphoebe/m2mKD): a *student* module is
  trained to match its *teacher* module, each placed in the same meta model: ``(1 - alpha) * CE +
  alpha * KD`` on the two meta-model outputs (``m2mKDLoss``); then the student is assembled and
  trained end to end on labels. When the student's width differs from the meta model's, linear
  *stitch layers* are put at the module's open ends during its training and dropped on assembly
  (the reference code's default). :func:`module_to_module_kd`.

Everything copies: :func:`split_model` copies the model's parts; the meta parts in a hybrid are frozen
copies; the returned models share nothing with the inputs.

Simplifications, named: the meta model is pre-trained here for a few epochs on the same data
(Deep-Incubation: 300 epochs); modules are trained one after another, not in parallel; the KD
term is batch-mean Hinton KD (the reference code divides the summed KL by the number of logits,
B * K, i.e. a K-times weaker term at the same ``alpha``); no mixup, drop-path or repeated
augmentation.

Training compute is counted as executed: every training step runs inside one
:class:`~brickwork.analysis.compute.FlopMeter` (forward, the teacher's pass and backward; the
optimizer's elementwise update is not a matmul and counts nothing by the accounting's convention),
and no validation pass runs inside the meter.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from brickwork.analysis.compute import FlopMeter
from brickwork.data.base import Split
from brickwork.errors import BrickworkError
from brickwork.nn.meta import MetaHybrid, ModuleDistillation, Piece
from brickwork.nn.modes import evaluating
from brickwork.nn.stack import Stack, StackModel
from brickwork.ops.stitch import StitchLayer
from brickwork.train.distill.losses import kd_divergence
from brickwork.train.loop import evaluate
from brickwork.train.losses import build_loss
from brickwork.train.recipe import TrainSettings, train_with


class AssembleError(BrickworkError):
    """A model cannot be divided, or a module does not fit the meta model's position."""


# -- dividing and assembling -----------------------------------------------------------------------


def divide(depth: int, modules: int, where: str = "modules") -> list[range]:
    """Body layer ranges of ``modules`` contiguous modules of a ``depth``-layer body, sizes differing by
    at most one (the larger ones first), as Deep-Incubation's ``divided_depths``.

    Raises:
        AssembleError: ``modules`` is below 1 or above ``depth``.
    """
    if not 1 <= modules <= depth:
        raise AssembleError(f"{where}: cannot divide {depth} body layers into {modules} modules; expected 1 to {depth}")
    base, extra = divmod(depth, modules)
    out, start = [], 0
    for i in range(modules):
        n = base + (1 if i < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


def split_model(model: StackModel, modules: int, where: str = "modules") -> list[Piece]:
    """``model`` as ``modules`` pieces (copies): the stem joins the first, the head the last.

    ``assemble(split_model(model, k))`` computes exactly what ``model`` computes.
    """
    ranges = divide(len(model.body), modules, where)
    layers = list(model.body.layers)
    last = len(ranges) - 1
    return [
        Piece(
            [copy.deepcopy(layers[j]) for j in r],
            stem=copy.deepcopy(model.stem) if i == 0 else None,
            head=copy.deepcopy(model.head) if i == last else None,
        )
        for i, r in enumerate(ranges)
    ]


def _joined(pieces: Sequence[Piece]) -> Piece:
    """One piece running ``pieces`` in order (their modules taken as they are)."""
    stems = [p.stem for p in pieces if p.stem is not None]
    heads = [p.head for p in pieces if p.head is not None]
    return Piece(
        [layer for p in pieces for layer in p.body.layers],
        stem=stems[0] if stems else None,
        head=heads[0] if heads else None,
    )


def assemble(pieces: Sequence[Piece]) -> StackModel:
    """The stack model of ``pieces`` in order (their modules taken as they are, not copied).

    Raises:
        AssembleError: the first piece has no stem, the last no head, or one in between has either.
    """
    for i, p in enumerate(pieces):
        if (p.stem is not None) != (i == 0) or (p.head is not None) != (i == len(pieces) - 1):
            raise AssembleError(
                f"assemble: piece {i} of {len(pieces)} has {'a' if p.stem is not None else 'no'} stem and "
                f"{'a' if p.head is not None else 'no'} head; only the first has a stem and only the last a head"
            )
    whole = _joined(pieces)
    assert whole.stem is not None and whole.head is not None
    return StackModel(whole.stem, Stack(list(whole.body.layers)), whole.head)


def meta_hybrid(meta: Sequence[Piece], slot: int, module: Piece) -> MetaHybrid:
    """The meta model (its pieces) with position ``slot`` held by ``module``.

    The meta pieces are copied and frozen; ``module`` is taken as it is, so training the hybrid
    trains ``module``.
    """
    if not 0 <= slot < len(meta):
        raise AssembleError(f"hybrid: position {slot} outside the meta model's {len(meta)} modules")
    before = _joined([copy.deepcopy(p) for p in meta[:slot]])
    after = _joined([copy.deepcopy(p) for p in meta[slot + 1 :]])
    return MetaHybrid(before, module, after)


# -- fitting a module into a position --------------------------------------------------------------


def _features(shape: Sequence[int]) -> int:
    """The feature size of a per-sample hidden shape: channels of (C, H, W), last dim otherwise."""
    return shape[0] if len(shape) == 3 else shape[-1]


def _others(shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(shape[1:]) if len(shape) == 3 else tuple(shape[:-1])


@torch.no_grad()
def boundaries(pieces: Sequence[Piece], x: Tensor) -> list[tuple[int, ...]]:
    """Per-sample shapes between the pieces run in order on ``x``: entry ``i`` is what piece ``i``
    hands on (the last entry is the model's output shape)."""
    out = []
    with evaluating(*pieces):
        for p in pieces:
            x = p(x)
            out.append(tuple(x.shape[1:]))
    return out


#: What a width mismatch message suggests where stitch layers may be used.
ADAPTER_HINT = "set adapters: true for learned stitch layers (m2mKD) or match the widths"
#: ... and where they may not: the modules that go into the final model as they are, and m2mKD's teachers.
SAME_WIDTH_HINT = "this module must fit the meta model as it is: give a meta model of its widths"


def fit_module(
    module: Piece,
    slot: int,
    meta_shapes: Sequence[tuple[int, ...]],
    module_shapes: tuple[tuple[int, ...] | None, tuple[int, ...]],
    *,
    adapters: bool,
    what: str,
    hint: str = ADAPTER_HINT,
) -> Piece:
    """``module`` ready for position ``slot`` of the meta model: itself when the shapes at its ends
    match the meta model's, else wrapped in linear stitch layers (m2mKD's ``pre_stitch`` /
    ``post_stitch``) if ``adapters``; the wrapper shares ``module``'s layers.

    Args:
        module: the module for the position.
        slot: the position.
        meta_shapes: :func:`boundaries` of the meta model's pieces.
        module_shapes: per-sample shape entering ``module`` in its own model (None for the first
            module, which takes the raw input) and the shape it hands on.
        adapters: whether stitch layers may be inserted.
        what: names the module in messages (``student module 1 (body layers 2-3)``).
        hint: what the message suggests when the widths differ and ``adapters`` is off.

    Raises:
        AssembleError: a shape differs at an end and ``adapters`` is off, or it differs in more
            than the feature size (the number of tokens, the image size).
    """
    last = slot == len(meta_shapes) - 1
    own_in, own_out = module_shapes
    # (what reaches the module's end, what that end needs): its input, then its output
    ends = [(meta_shapes[slot - 1] if slot > 0 else None, own_in, "takes"), (own_out, meta_shapes[slot], "hands on")]
    stitch: list[nn.Module | None] = [None, None]
    for k, (given, wanted, verb) in enumerate(ends):
        if given is None or wanted is None or given == wanted:
            continue
        mine, theirs = (wanted, given) if k == 0 else (given, wanted)
        problem = f"{what} {verb} per-sample shape {mine} but the meta model has {theirs} at position {slot}"
        if _others(given) != _others(wanted) or (k == 1 and last):
            raise AssembleError(f"{problem}; they differ in more than the feature size, which no stitch layer mends")
        if not adapters:
            raise AssembleError(f"{problem}; {hint}")
        stitch[k] = StitchLayer(_features(given), _features(wanted))
    pre, post = stitch
    if pre is None and post is None:
        return module
    layers = ([pre] if pre is not None else []) + list(module.body.layers) + ([post] if post is not None else [])
    return Piece(layers, stem=module.stem, head=module.head)


def module_shapes(
    model: StackModel, ranges: Sequence[range], x: Tensor
) -> list[tuple[tuple[int, ...] | None, tuple[int, ...]]]:
    """For each module of ``model`` (body layer ranges): the per-sample shape entering it (None
    for the first) and the shape it hands on (the output's for the last)."""
    with evaluating(model), torch.no_grad():
        h = model.stem(x)
        hidden = [tuple(t.shape[1:]) for t in model.body.taps(h, list(range(len(model.body))))]
        out_shape = tuple(model(x).shape[1:])
        entering = tuple(h.shape[1:])
    shapes: list[tuple[tuple[int, ...] | None, tuple[int, ...]]] = []
    for i, r in enumerate(ranges):
        first = None if i == 0 else (entering if r.start == 0 else hidden[r.start - 1])
        shapes.append((first, out_shape if i == len(ranges) - 1 else hidden[r.stop - 1]))
    return shapes


def fitted_modules(
    model: StackModel, meta: StackModel, modules: int, probe: Tensor, *, adapters: bool | None, role: str
) -> tuple[list[Piece], list[Piece]]:
    """``model``'s ``modules`` modules (copies) and each made ready for its position of ``meta``
    (:func:`fit_module`: itself, or wrapped in stitch layers sharing its layers), all checked on the
    input batch ``probe`` before anything trains. ``adapters=None``: stitch layers are not an option
    for these modules (a target's, a teacher's), and a width mismatch says so.

    Raises:
        AssembleError: ``modules`` above either depth, or a module that does not fit its position.
    """
    ranges = divide(len(model.body), modules, f"{role} modules")
    meta_shapes = boundaries(split_model(meta, modules, "meta model"), probe)
    own = module_shapes(model, ranges, probe)
    pieces = split_model(model, modules)
    slots = [
        fit_module(
            p,
            i,
            meta_shapes,
            own[i],
            adapters=bool(adapters),
            what=f"{role} module {i} (body layers {r.start}-{r.stop - 1})",
            hint=ADAPTER_HINT if adapters is not None else SAME_WIDTH_HINT,
        )
        for i, (p, r) in enumerate(zip(pieces, ranges, strict=True))
    ]
    return pieces, slots


# -- training, counted -----------------------------------------------------------------------------


@dataclass
class Phase:
    """One training run of a method: what was trained, its executed training FLOPs, its history."""

    name: str
    flops: int
    history: list[dict[str, Any]] = field(default_factory=list)
    val_accuracy: float | None = None


def train_counted(
    model: nn.Module,
    train: Split,
    settings: TrainSettings,
    *,
    seed: int,
    aux_weights: dict[str, float] | None = None,
    device: str = "cpu",
    progress: bool | None = None,
    desc: str = "train",
) -> tuple[list[dict[str, Any]], int]:
    """Train ``model`` with :func:`~brickwork.train.recipe.train_with` and count the FLOPs of every step.

    The loop runs with an empty validation split, so the meter sees training steps only (forward,
    a ``training_loss`` hook's extra passes such as a teacher's, and backward).

    Returns:
        The loop's history and the FLOPs executed.
    """
    empty = Split(train.x[:0], train.y[:0])
    with FlopMeter() as meter:
        history = train_with(
            model,
            train,
            empty,
            settings,
            seed=seed,
            aux_weights=aux_weights,
            device=device,
            progress=progress,
            desc=desc,
        )
    return history, meter.total


def step_flops(model: nn.Module, x: Tensor, y: Tensor, loss: str = "cross_entropy") -> int:
    """FLOPs of one training step of ``model`` on the batch ``(x, y)`` (forward, objective, backward),
    run on a copy so that ``model`` is untouched. For planning a budget; the counted figure is
    :func:`train_counted`'s."""
    probe = copy.deepcopy(model).train()
    loss_fn = build_loss(loss)
    objective = getattr(probe, "training_loss", None)
    with FlopMeter() as meter:
        value = objective(x, y, loss_fn) if callable(objective) else loss_fn(probe(x), y)
        value.backward()
    return meter.total


def epochs_for_budget(model: nn.Module, train: Split, settings: TrainSettings, budget: float) -> int:
    """Epochs of ``settings``' batches over ``train`` that cost about ``budget`` training FLOPs (at least 1).

    One step's FLOPs on a full batch is measured and scaled by the samples per epoch (the models
    here cost the same per sample; a routed one is estimated from that batch's routing).
    """
    b = min(settings.batch_size, len(train))
    per_epoch = step_flops(model, train.x[:b], train.y[:b], settings.loss) * len(train) / b
    return max(1, round(budget / per_epoch))


def logit_kd(temperature: float) -> Callable[[Tensor, Tensor], Tensor]:
    """Hinton et al.'s soft-target term ``tau^2 * KL(p_teacher || p_student)``, batch mean over every
    row of (B, K) or (B, T, K) logits: :func:`brickwork.train.distill.losses.kd_divergence`."""

    def kd(student: Tensor, teacher: Tensor) -> Tensor:
        return kd_divergence(student, teacher, temperature)

    return kd


# -- the two methods -------------------------------------------------------------------------------


@dataclass
class Trainer:
    """What every phase shares: the data, the seed, the device, the bricks' auxiliary-loss weights."""

    train: Split
    val: Split
    seed: int
    device: str = "cpu"
    aux_weights: dict[str, float] = field(default_factory=dict)
    progress: bool | None = None

    def run(
        self, name: str, model: nn.Module, settings: TrainSettings, epochs: int, objective: nn.Module | None = None
    ) -> Phase:
        """Train ``objective`` (default ``model``) for ``epochs``; validate ``model`` once afterwards."""
        torch.manual_seed(self.seed)
        history, flops = train_counted(
            objective if objective is not None else model,
            self.train,
            dataclasses.replace(settings, epochs=epochs),
            seed=self.seed,
            aux_weights=self.aux_weights,
            device=self.device,
            progress=self.progress,
            desc=name,
        )
        return Phase(name, flops, history, self.accuracy(model))

    @torch.no_grad()
    def accuracy(self, model: nn.Module) -> float | None:
        """Accuracy of ``model`` on the validation split (None when it is empty)."""
        if not len(self.val):
            return None
        return evaluate(model, self.val, build_loss("cross_entropy"), device=self.device)["accuracy"]


@dataclass
class Assembled:
    """A method's result: the final model, the trained meta model, and each training phase."""

    model: StackModel
    meta: StackModel
    phases: list[Phase]
    incubated: float | None = None  # validation accuracy of the assembly before fine-tuning

    @property
    def train_flops(self) -> int:
        return sum(p.flops for p in self.phases)


#: The name of the meta model's pre-training phase.
PRETRAIN = "meta model (PT)"


def pretrain_meta(meta: StackModel, modules: int, trainer: Trainer, settings: TrainSettings, epochs: int) -> Phase:
    """Train the meta model end to end (Deep-Incubation's PT phase); ``meta`` must have ``modules`` layers
    or more (it is divided like the target)."""
    divide(len(meta.body), modules, "meta model")
    return trainer.run(PRETRAIN, meta, settings, epochs)


def _meta_ready(
    meta: StackModel, modules: int, trainer: Trainer, settings: TrainSettings, epochs: int, trained: bool
) -> tuple[StackModel, list[Piece], list[Phase]]:
    """A copy of ``meta``, pre-trained unless ``trained`` or ``epochs`` is 0; its pieces; the phases run."""
    meta = copy.deepcopy(meta)
    phases = [pretrain_meta(meta, modules, trainer, settings, epochs)] if not trained and epochs > 0 else []
    return meta, split_model(meta, modules, "meta model"), phases


def _assembled(
    pieces: Sequence[Piece],
    meta: StackModel,
    phases: list[Phase],
    trainer: Trainer,
    settings: TrainSettings,
    epochs: int,
    name: str,
) -> Assembled:
    """The trained modules assembled, validated once, then trained end to end for ``epochs``."""
    model = assemble(pieces)
    incubated = trainer.accuracy(model)
    if epochs:
        phases.append(trainer.run(name, model, settings, epochs))
    return Assembled(model, meta, phases, incubated)


def deep_model_assembling(
    target: StackModel,
    meta: StackModel,
    modules: int,
    trainer: Trainer,
    settings: TrainSettings,
    *,
    meta_epochs: int,
    module_epochs: int,
    finetune_epochs: int,
    meta_trained: bool = False,
) -> Assembled:
    """Deep Model Assembling: pre-train ``meta`` (unless ``meta_trained`` or ``meta_epochs`` is 0), train
    each of ``target``'s ``modules`` modules in its position of the meta model on the task loss,
    assemble, fine-tune.

    Copies: ``target`` and ``meta`` are not changed (the meta model is trained on a copy).

    Raises:
        AssembleError: ``modules`` above either depth, or a module whose shapes do not match the meta
            model's at its position.
    """
    probe = trainer.train.x[:2].to(trainer.device)
    pieces, _ = fitted_modules(target, meta, modules, probe, adapters=None, role="target")  # before any training
    meta, meta_pieces, phases = _meta_ready(meta, modules, trainer, settings, meta_epochs, meta_trained)
    for i, piece in enumerate(pieces):
        phases.append(trainer.run(f"module {i} (MT)", meta_hybrid(meta_pieces, i, piece), settings, module_epochs))
    return _assembled(pieces, meta, phases, trainer, settings, finetune_epochs, "assembled (FT)")


def module_to_module_kd(
    teacher: StackModel,
    student: StackModel,
    meta: StackModel,
    modules: int,
    trainer: Trainer,
    settings: TrainSettings,
    *,
    meta_epochs: int,
    module_epochs: int,
    finetune_epochs: int,
    alpha: float = 0.5,
    temperature: float = 1.0,
    adapters: bool = False,
    meta_trained: bool = False,
) -> Assembled:
    """m2mKD: train each of ``student``'s ``modules`` modules to match ``teacher``'s module in the same
    position of the meta model, assemble the student, train it end to end on labels.

    The teacher's modules must fit the meta model as they are (m2mKD incubates them in it first, as
    Deep Model Assembling does: run that on the teacher with the same meta model); a student module
    whose width differs gets stitch layers when ``adapters`` is on. Copies: no input is changed.

    Raises:
        AssembleError: ``modules`` above a depth, or a module that does not fit its position (for a
            student without ``adapters``, or a teacher).
    """
    probe = trainer.train.x[:2].to(trainer.device)
    t_pieces, _ = fitted_modules(teacher, meta, modules, probe, adapters=None, role="teacher")
    s_pieces, s_slots = fitted_modules(student, meta, modules, probe, adapters=adapters, role="student")
    meta, meta_pieces, phases = _meta_ready(meta, modules, trainer, settings, meta_epochs, meta_trained)
    kd = logit_kd(temperature)
    for i, (t, slot) in enumerate(zip(t_pieces, s_slots, strict=True)):
        pair = ModuleDistillation(meta_hybrid(meta_pieces, i, slot), t, kd, alpha)
        phases.append(trainer.run(f"student module {i} (m2mKD)", pair.student, settings, module_epochs, objective=pair))
    # the stitch layers stay behind, as in the reference code's default
    return _assembled(s_pieces, meta, phases, trainer, settings, finetune_epochs, "assembled student (E2E)")


def plain_kd(teacher: StackModel, student: StackModel, alpha: float, temperature: float) -> ModuleDistillation:
    """Logit KD of a whole student from a whole teacher: the one-module case of m2mKD's objective
    (no meta model around the pair). Trains ``student`` in place; the teacher is copied and frozen."""
    return ModuleDistillation(
        MetaHybrid(Piece([]), _whole(student), Piece([])), _whole(copy.deepcopy(teacher)), logit_kd(temperature), alpha
    )


def _whole(model: StackModel) -> Piece:
    """``model`` as one piece sharing its modules."""
    return Piece(list(model.body.layers), stem=model.stem, head=model.head)
