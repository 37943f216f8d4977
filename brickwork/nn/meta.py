"""Pieces of a stack model, and a meta model with one of its positions held by a module in training.

Deep Model Assembling (Ni et al., 2023, "Deep Model Assembling", arXiv 2212.04129; code
LeapLabTHU/Deep-Incubation) divides a target model into K modules and trains each one inside a
small shared *meta model* whose other positions are light meta layers, then assembles the trained
modules. m2mKD (Lo et al., 2024, arXiv 2402.16918) trains student modules the same way, matching
the output of the meta model with the teacher's module in that position. Three bricks serve both:

* :class:`Piece`: a contiguous part of a :class:`~brickwork.nn.stack.StackModel`, the stem
  included in the first one and the head in the last one (as Deep-Incubation's ``stages[0]``
  holds the patch embedding and its last stage the norm and classifier);
* :class:`MetaHybrid`: ``after(slot(before(x)))``, the meta model with position ``i`` replaced
  by a module; the meta parts are frozen, so a training step changes only the module;
* :class:`ModuleDistillation`: m2mKD's objective for one teaching pair, the student module and
  the teacher module each run in the same meta model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from brickwork.nn.stack import Stack

#: A loss between the student's and the teacher's outputs, (B, ..., K) each -> scalar.
DistillFn = Callable[[Tensor, Tensor], Tensor]


class Piece(nn.Module):
    """``head(body(stem(x)))`` over a contiguous run of a stack model's body layers.

    Only the first piece of a model has a stem and only the last one a head; a piece of the
    middle maps a hidden state to a hidden state. An empty piece (no layers, no stem, no head)
    is the identity.

    Args:
        layers: the body layers, in order.
        stem: the model's stem, for the first piece.
        head: the model's head, for the last piece.

    Shapes:
        first piece: the model's input -> hidden (B, ...); middle: hidden -> hidden;
        last piece: hidden -> the model's output (B, K) or (B, T, K).
    """

    def __init__(self, layers: Sequence[nn.Module], stem: nn.Module | None = None, head: nn.Module | None = None):
        super().__init__()
        self.stem = stem
        self.body = Stack(layers)
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        if self.stem is not None:
            x = self.stem(x)
        x = self.body(x)
        return self.head(x) if self.head is not None else x


def _freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


class MetaHybrid(nn.Module):
    """A meta model whose position ``slot`` is held by a module being trained: ``after(slot(before(x)))``.

    ``before`` is the meta model's pieces ahead of the position (with its stem), ``after`` the
    pieces behind it (with its head). Both are frozen here (``requires_grad`` off): in
    Deep-Incubation's modular training only the target module is optimised and the meta model
    stays as it was pre-trained. They keep the hybrid's train/eval mode (the reference code
    leaves the meta layers' dropout on while a module trains).

    Args:
        before: meta pieces ahead of the position, as one piece (empty for position 0).
        slot: the module trained in this position.
        after: meta pieces behind the position, as one piece (empty for the last position).

    Shapes:
        the model's input -> the model's output.
    """

    def __init__(self, before: Piece, slot: Piece, after: Piece) -> None:
        super().__init__()
        _freeze(before)
        _freeze(after)
        self.before = before
        self.slot = slot
        self.after = after

    def forward(self, x: Tensor) -> Tensor:
        return self.after(self.slot(self.before(x)))


class ModuleDistillation(nn.Module):
    """m2mKD's objective for one teaching pair: student and teacher module in one meta model.

    Both modules take the meta model's hidden state before their position and hand theirs to
    the meta model's rest; the loss is ``(1 - alpha) * task(student, y) + alpha * distill(student,
    teacher)`` on the two outputs of the meta model (kamanphoebe/m2mKD ``m2mKDLoss``:
    ``base_loss * alpha_student + teacher_loss * alpha_teacher``, both through the meta model).
    The meta prefix is computed once for both. The teacher module is frozen and kept in eval
    mode; its pass runs without autograd.

    With an empty ``before`` and ``after`` (one module: the whole model) this is plain logit
    distillation of a whole student from a whole teacher.

    Args:
        student: the meta model with the student module in the position.
        teacher: the teacher's module for the same position.
        distill: loss between student and teacher outputs (logit KD).
        alpha: weight of the distillation term, in [0, 1].

    Shapes:
        forward: the model's input -> the student hybrid's output.
    """

    def __init__(self, student: MetaHybrid, teacher: Piece, distill: DistillFn, alpha: float) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"ModuleDistillation: alpha must be in [0, 1], got {alpha}")
        _freeze(teacher)
        self.student = student
        self.teacher = teacher.eval()
        self.distill = distill
        self.alpha = alpha

    def train(self, mode: bool = True) -> ModuleDistillation:
        super().train(mode)
        self.teacher.eval()  # a frozen teacher answers as it does at inference
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self.student(x)

    def outputs(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The student hybrid's output and, without autograd, the teacher hybrid's."""
        h = self.student.before(x)
        s = self.student.after(self.student.slot(h))
        with torch.no_grad():
            t = self.student.after(self.teacher(h))
        return s, t

    def training_loss(self, x: Tensor, y: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        """``(1 - alpha) * loss_fn(student, y) + alpha * distill(student, teacher)`` (the loop's hook)."""
        s, t = self.outputs(x)
        return (1.0 - self.alpha) * loss_fn(s, y) + self.alpha * self.distill(s, t)
