"""General knowledge transfer between two pretrained models with data partitioning (Roth et al., 2024).

"Fantastic Gains and Where to Find Them: On the Existence and Prospect of General Knowledge
Transfer between Any Pretrained Model" (Roth, Thede, Koepke, Vinyals, Hénaff, Akata; ICLR 2024)
observes that any two pretrained models, whatever their architectures or accuracies, each get
right samples the other gets wrong ("complementary knowledge", measured as prediction flips:
:mod:`brickwork.train.distill.flips`). Plain distillation from the other model moves some of that
knowledge but makes the student forget its own (negative flips); with a weaker teacher the student
ends worse than it started. The paper treats transfer as continual learning and proposes

* **KL-Dist + DP** (data partitioning): the student is distilled from two frozen teachers, the
  other model and *its own initial self*, and each training sample is given to the one that is
  more confident in the sample's true class: ``p_teacher(y | x) > p_student0(y | x)``. So the
  teacher teaches where it knows better and the student's own initial predictions hold it in
  place elsewhere; the loss is the temperature-scaled KL divergence to the chosen teacher's
  distribution, and no cross-entropy (``alpha = 1`` in the authors' ``kl_dp_dist.yaml``);
* **unsupervised DP**: the same without labels, by the larger maximum softmax probability;

against the baselines **KL-Dist** (KL to the teacher on every sample, no labels) and
**XE-KL-Dist** (Hinton's ``alpha * KL + (1 - alpha) * CE``).

How this module follows the authors' code (``main_distillation.py``, loss ``xekl_dp``, strategy
``most-conf``, ``k`` = all classes): the partition compares plain softmax probabilities
(temperature 1) whatever the distillation temperature; ties go to the student's own self (strict
``>``); the KL runs over all classes (their top-``k`` restriction is off at ``k = 1000`` on
ImageNet). Not implemented: their MCL baseline (momentum weight interpolation) and the
multi-teacher variant.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from brickwork.data.base import Split
from brickwork.errors import BrickworkError
from brickwork.registry import register
from brickwork.train.distill.cache import build_cache
from brickwork.train.distill.losses import PairLoss, check_same_space, kd_divergence
from brickwork.train.distill.objective import Distiller, Term, teacher_taps
from brickwork.train.distill.taps import frozen_teacher
from brickwork.train.recipe import TrainSettings, train_with

#: How a sample is given to the teacher or the student's initial self: by confidence in the
#: true class (``supervised``, the paper's default) or by the largest probability (``unsupervised``).
PartitionRule = Literal["supervised", "unsupervised"]


def teacher_mask(teacher_logits: Tensor, own_logits: Tensor, y: Tensor | None, rule: PartitionRule) -> Tensor:
    """Which samples the teacher teaches (True) and which the student's initial self (False).

    Args:
        teacher_logits: (B, K) logits of the other pretrained model (the teacher).
        own_logits: (B, K) logits of the student before the transfer (its frozen initial self).
        y: (B,) true classes; needed for ``supervised``, ignored for ``unsupervised``.
        rule: ``supervised``: ``softmax(teacher)[y] > softmax(own)[y]``; ``unsupervised``:
            ``max softmax(teacher) > max softmax(own)``. Ties go to the student's own self.

    Returns:
        (B,) bool.

    Raises:
        BrickworkError: shapes differ, or ``supervised`` without labels of shape (B,).
    """
    if teacher_logits.shape != own_logits.shape or teacher_logits.dim() != 2:
        raise BrickworkError(
            f"data partitioning: teacher and initial-student logits must both be (B, K); got "
            f"{tuple(teacher_logits.shape)} and {tuple(own_logits.shape)}"
        )
    p_t, p_s = teacher_logits.softmax(-1), own_logits.softmax(-1)
    if rule == "unsupervised":
        return p_t.amax(-1) > p_s.amax(-1)
    if y is None or y.shape != teacher_logits.shape[:1]:
        got = None if y is None else tuple(y.shape)
        raise BrickworkError(f"data partitioning (supervised): labels must be ({len(teacher_logits)},); got {got}")
    idx = y.long().unsqueeze(-1)
    return p_t.gather(-1, idx).squeeze(-1) > p_s.gather(-1, idx).squeeze(-1)


def partitioned_targets(teacher_logits: Tensor, own_logits: Tensor, mask: Tensor) -> Tensor:
    """(B, K) distillation targets: the teacher's logits where ``mask`` (B,) is True, else the student's own."""
    return torch.where(mask.unsqueeze(-1), teacher_logits, own_logits)


def partitioned_kd(student: Tensor, pair: Tensor, y: Tensor, temperature: float, rule: PartitionRule) -> Tensor:
    """KL-Dist + DP: tau^2 * KL to the teacher where it is more confident, else to the student's own self.

    Args:
        student: (B, K) logits of the student being trained.
        pair: (B, 2, K) logits of the two frozen teachers, the other model first, the student's
            initial self second (:class:`TeacherAndSelf`).
        y: (B,) true classes (used by the ``supervised`` rule only).
        temperature: tau of the KL (the partition itself compares probabilities at tau = 1).
        rule: see :func:`teacher_mask`.
    """
    if pair.dim() != 3 or pair.shape[1] != 2:
        raise BrickworkError(
            "kl_dp: the teacher tensor must be (B, 2, K) (the teacher and the student's initial self); "
            f"got {tuple(pair.shape)}"
        )
    teacher, own = pair[:, 0], pair[:, 1]
    check_same_space(student, teacher, "kl_dp")
    return kd_divergence(student, partitioned_targets(teacher, own, teacher_mask(teacher, own, y, rule)), temperature)


@register("distill_loss", "kl_dp")
def kl_dp_term(temperature: Annotated[float, Field(gt=0)] = 1.0, rule: PartitionRule = "supervised") -> PairLoss:
    """Data-partitioned KL (Roth et al., 2024); the teacher tensor is :class:`TeacherAndSelf`'s (B, 2, K)."""
    return lambda s, t, y: partitioned_kd(s, t, y, temperature, rule)


class TeacherAndSelf(nn.Module):
    """The two frozen teachers of data-partitioned transfer run as one model.

    The other pretrained model and the student's initial self are both read through the
    distiller's teacher slot (so caching and taps work unchanged); both are frozen and in eval
    mode (:func:`~brickwork.train.distill.taps.frozen_teacher`).

    Shapes:
        (B, ...) inputs -> (B, 2, K): ``[:, 0]`` the teacher's logits, ``[:, 1]`` the initial student's.
    """

    def __init__(self, teacher: nn.Module, own: nn.Module) -> None:
        super().__init__()
        self.teacher = frozen_teacher(teacher)
        self.own = frozen_teacher(own)

    def forward(self, x: Tensor) -> Tensor:
        t, s = self.teacher(x), self.own(x)
        if t.shape != s.shape:
            raise BrickworkError(
                f"transfer: teacher outputs {tuple(t.shape)} and student outputs {tuple(s.shape)} are not "
                "the same output space; transfer needs two models of the same classes"
            )
        return torch.stack([t, s], 1)


#: A transfer method by name. ``labels``: go on training on the labels alone for as many steps
#: (the control: what the extra training does without a teacher); ``kl``: KL-Dist, KL to the teacher
#: on every sample; ``xekl``: XE-KL-Dist, Hinton's ``alpha * KL + (1 - alpha) * CE``; ``kl_dp``:
#: KL-Dist + DP (supervised partition); ``kl_dp_unsup``: the same by the unsupervised partition.
TransferMethod = Literal["labels", "kl", "xekl", "kl_dp", "kl_dp_unsup"]


def transfer_terms(method: TransferMethod, temperature: float = 1.0, alpha: float = 0.5) -> dict[str, Term]:
    """The distillation objective of ``method`` as named terms (registered losses, no code).

    Args:
        method: see :data:`TransferMethod`.
        temperature: tau of every KL term.
        alpha: weight of the KL term in ``xekl`` (the cross-entropy gets ``1 - alpha``).
    """
    if method == "labels":
        return {"labels": Term("labels")}  # cross-entropy only: no teacher tensor is read
    if method == "kl":
        return {"kl": Term("logit_kd", args={"temperature": temperature, "alpha": 0.0, "beta": 1.0})}
    if method == "xekl":
        return {"xekl": Term("logit_kd", args={"temperature": temperature, "alpha": 1 - alpha, "beta": alpha})}
    rule = "unsupervised" if method == "kl_dp_unsup" else "supervised"
    return {"kl_dp": Term("kl_dp", args={"temperature": temperature, "rule": rule})}


def transfer(
    student: nn.Module,
    teacher: nn.Module,
    train: Split,
    val: Split,
    method: TransferMethod,
    settings: TrainSettings,
    *,
    seed: int,
    temperature: float = 1.0,
    alpha: float = 0.5,
    cache: bool = True,
    device: str = "cpu",
    state_path: Path | None = None,
    progress: bool | None = None,
    desc: str = "transfer",
    log_dir: Path | None = None,
) -> list[dict[str, Any]]:
    """Transfer knowledge from ``teacher`` into ``student`` (in place) with ``method``, on ``train``.

    The student's initial self (for the ``kl_dp`` methods) is a frozen copy taken here, before
    any step. Training is the ordinary loop (:func:`~brickwork.train.recipe.train_with`) on a
    :class:`~brickwork.train.distill.objective.Distiller`, so batch order, schedules, resume and
    the non-finite policy are those of every ``train`` stage; ``settings.loss`` is the
    validation loss only. With ``cache`` the frozen teacher (and initial self) run once over the
    training inputs (:func:`~brickwork.train.distill.cache.build_cache`; refused where that would
    change training) instead of at every step. ``log_dir``: the training's TensorBoard folder
    (None: no curves).

    Returns:
        The per-epoch history of the loop.
    """
    fit: dict[str, Any] = {
        "seed": seed,
        "device": device,
        "state_path": state_path,
        "progress": progress,
        "desc": desc,
        "log_dir": log_dir,
    }
    if method == "labels":  # the control trains the student alone: no teacher pass per step
        return train_with(student, train, val, settings, **fit)
    terms = transfer_terms(method, temperature, alpha)
    source: nn.Module = frozen_teacher(teacher)
    if method in ("kl_dp", "kl_dp_unsup"):
        source = frozen_teacher(TeacherAndSelf(teacher, copy.deepcopy(student)))  # the pair in eval mode too
    cached = build_cache(source, teacher_taps(terms), train.x, device=device) if cache else None
    distiller = Distiller(student, source, terms, train.y.to(device), probe=train.x[:8].to(device), cache=cached)
    rows = Split(train.x, torch.arange(len(train)))
    return train_with(distiller, rows, val, settings, **fit)
