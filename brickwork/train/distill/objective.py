"""A distillation objective: a weighted sum of named loss terms over taps, and the student wrapper that trains with it.

:class:`Term` is one term as a config writes it: a registered ``distill_loss`` with its
arguments, a weight, the student's and the teacher's taps, and whether a learned adapter maps
the student's tensor to the teacher's shape. :class:`Distiller` wraps a student so that the
ordinary training loop (``train.loop.train_step`` through the ``training_loss`` hook of
``nn.hooks``) trains it against a teacher: no second loop.

The teacher is held outside the module tree (not a submodule): ``Distiller.train()`` and the
optimizer never reach it, so it stays frozen and in eval mode, and a saved training state holds
the student and the adapters only.

Rows: the distiller is trained on ``(x, i)`` pairs where ``i`` is the (B,) row index of each
sample in the training split. It looks the labels up (``labels[i]``) and, with a
:class:`~brickwork.train.distill.cache.TeacherCache`, the teacher's tensors too, so a cached
teacher needs no hook in the loop. Evaluation calls ``forward`` (the student alone) with the
real labels.
"""

from __future__ import annotations

import inspect
from typing import Annotated, Any

import pydantic
import torch
from pydantic import Field
from pydantic.dataclasses import dataclass
from torch import Tensor, nn

from brickwork.errors import BrickworkError, ConfigError
from brickwork.registry import REGISTRY, RegistryName
from brickwork.train.distill.losses import LOGIT_TERMS, PairLoss, check_same_space
from brickwork.train.distill.taps import Tap, TapIO, TapRecorder, adapter, module_at
from brickwork.train.losses import LossFn

Arg = float | int | str | bool


@dataclass(frozen=True, config=pydantic.ConfigDict(extra="forbid"))
class Term:
    """One weighted term of a distillation objective.

    Attributes:
        loss: a registered distillation loss (``brickwork ls distill_loss``).
        weight: its weight in the sum.
        args: the loss's own arguments (``{temperature: 4, alpha: 0.1, beta: 0.9}`` for ``logit_kd``).
        student: module path of the student's tap (``""``: the student's output, its logits).
        teacher: module path of the teacher's tap (``""``: the teacher's output).
        student_io, teacher_io: tap the module's ``input`` or ``output``.
        adapter: learn a projection from the student's tensor to the teacher's shape (FitNets'
            regressor); without it, tensors of different shapes are an error for ``hint``.
    """

    loss: Annotated[str, RegistryName("distill_loss")]
    weight: Annotated[float, Field(ge=0)] = 1.0
    args: dict[str, Arg] = pydantic.Field(default_factory=dict)
    student: str = ""
    teacher: str = ""
    student_io: TapIO = "output"
    teacher_io: TapIO = "output"
    adapter: bool = False

    def __post_init__(self) -> None:
        try:
            self.build()  # the name and the arguments are checked against the loss's signature at validation
        except ConfigError as e:  # a ValueError gets the key path from pydantic
            raise ValueError(str(e)) from None

    def build(self) -> PairLoss:
        """The loss function with its arguments (checked strictly: unknown keys, wrong types, ranges)."""
        factory = REGISTRY.get("distill_loss", self.loss).obj
        known = inspect.signature(factory).parameters
        for k in self.args:
            if k not in known:
                raise ValueError(f"unknown argument {k!r} for distill_loss {self.loss!r}; expected {list(known)}")
        fn: PairLoss = pydantic.validate_call(config=pydantic.ConfigDict(strict=True))(factory)(**self.args)
        return fn

    @property
    def student_tap(self) -> Tap:
        return Tap(self.student, self.student_io)

    @property
    def teacher_tap(self) -> Tap:
        return Tap(self.teacher, self.teacher_io)


def teacher_taps(terms: dict[str, Term]) -> list[Tap]:
    """The teacher's taps the terms read (each once, in order; the ``labels`` term reads none)."""
    return list(dict.fromkeys(t.teacher_tap for t in terms.values() if t.loss != "labels"))


class Distiller(nn.Module):
    """A student trained against a frozen teacher with a weighted sum of distillation terms.

    Args:
        student: the model being trained (a registered submodule; ``forward`` is the student's).
        teacher: the frozen teacher (eval mode, no gradients; held outside the module tree);
            None when every teacher tensor comes from ``cache``.
        terms: the named terms of the objective.
        labels: (N, ...) the training split's targets; ``training_loss`` receives row indices.
        probe: (b, ...) a few training inputs, run once through both models to check every tap
            and shape and to build the adapters before the optimizer is made.
        cache: the teacher's tensors for every training row, instead of running the teacher.

    Raises:
        BrickworkError: a tap path that does not exist, tensors of different shapes without an
            adapter, or a logit term between different output spaces (names paths and shapes).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        terms: dict[str, Term],
        labels: Tensor,
        probe: Tensor,
        cache: Any = None,
    ) -> None:
        super().__init__()
        if not terms:
            raise BrickworkError("distill: no loss terms; name at least one under losses:")
        if teacher is None and cache is None:
            raise BrickworkError("distill: a teacher or a teacher cache is needed")
        self.student = student
        self._teacher = (teacher,)  # a tuple: not a submodule, so train() and parameters() skip it
        self.terms = dict(terms)
        self.losses = {name: t.build() for name, t in self.terms.items()}
        self.register_buffer("labels", labels, persistent=False)
        self.cache = cache
        self.student_taps = list(dict.fromkeys(t.student_tap for t in self.terms.values()))
        self.teacher_taps = teacher_taps(self.terms)
        for name, t in self.terms.items():
            module_at(student, t.student, where=f"losses.{name}.student")
            if teacher is not None and t.loss != "labels":
                module_at(teacher, t.teacher, where=f"losses.{name}.teacher")
        # Paths resolved once: each step only registers and removes the hooks.
        self._student_rec = TapRecorder(student, self.student_taps)
        self._teacher_rec = TapRecorder(teacher, self.teacher_taps) if teacher is not None else None
        self._plan = [(n, t.weight, self.losses[n], t.student_tap, t.teacher_tap) for n, t in self.terms.items()]
        self.adapters = nn.ModuleDict()
        self._check_shapes(probe)

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher[0]

    def forward(self, x: Tensor) -> Tensor:
        return self.student(x)

    def teacher_tensors(self, x: Tensor, rows: Tensor | None = None) -> dict[Tap, Tensor]:
        """The teacher's tapped tensors for inputs ``x`` (B, ...): from the cache by ``rows``, or live."""
        if self.cache is not None and rows is not None:
            return self.cache.lookup(rows)
        teacher, rec = self.teacher, self._teacher_rec
        if teacher is None or rec is None:
            raise BrickworkError("distill: the teacher cache needs row indices and there is no live teacher")
        with torch.no_grad():
            return rec.run(x)

    def objective(self, x: Tensor, y: Tensor, teacher: dict[Tap, Tensor]) -> Tensor:
        """The weighted sum of the terms for inputs ``x`` (B, ...) and targets ``y`` (B, ...)."""
        values = self._student_rec.run(x)
        total: Tensor | None = None
        for name, weight, fn, student_tap, teacher_tap in self._plan:
            s = values[student_tap]
            if name in self.adapters:
                s = self.adapters[name](s)
            t = teacher.get(teacher_tap, s)  # the labels term reads no teacher tensor
            value = weight * fn(s, t, y)
            total = value if total is None else total + value
        assert total is not None  # terms are never empty (checked in __init__)
        return total

    def training_loss(self, x: Tensor, rows: Tensor, loss_fn: LossFn) -> Tensor:
        """The loop's hook (``nn.hooks``): ``rows`` are the batch's (B,) indices in the training split.

        ``loss_fn`` (the stage's task loss) is not used: the ``labels`` and ``logit_kd`` terms
        carry the label loss, so the objective says exactly what is optimised.
        """
        labels = self.get_buffer("labels")
        rows = rows.to(labels.device)
        return self.objective(x, labels[rows], self.teacher_tensors(x, rows))

    @torch.no_grad()
    def _check_shapes(self, probe: Tensor) -> None:
        """Run ``probe`` through both models once: check each pair of taps and build the adapters."""
        was = self.student.training
        self.student.eval()  # the probe must not move batch-norm statistics
        try:
            values = self._student_rec.run(probe)
        finally:
            self.student.train(was)
        rows = torch.arange(len(probe)) if self.cache is not None else None
        teacher = self.teacher_tensors(probe, rows)
        for name, term in self.terms.items():
            if term.loss == "labels":
                continue
            s, t = values[term.student_tap], teacher[term.teacher_tap]
            where = f"losses.{name}: student {term.student_tap} {tuple(s.shape)}, teacher {term.teacher_tap}"
            if term.loss in LOGIT_TERMS:
                if term.adapter:
                    raise BrickworkError(f"{where} {tuple(t.shape)}: {term.loss} compares logits; no adapter")
                check_same_space(s, t, f"{where} {tuple(t.shape)}: {term.loss}")
                continue
            if term.adapter:
                self.adapters[name] = adapter(tuple(s.shape[1:]), tuple(t.shape[1:])).to(s.device, s.dtype)
            elif s.shape != t.shape and term.loss == "hint":
                raise BrickworkError(
                    f"{where} {tuple(t.shape)}: shapes differ and the term has no adapter; set adapter: true"
                )
            elif len(s) != len(t):
                raise BrickworkError(f"{where} {tuple(t.shape)}: batch sizes differ")
