"""Prediction flips: what a transfer gave a student and what it took away (Roth et al., 2024).

"Fantastic Gains and Where to Find Them" (Roth, Thede, Koepke, Vinyals, Hénaff, Akata; ICLR
2024) measures knowledge transfer between two pretrained models with prediction flips on held-out
data. Between two sets of predictions ``a`` and ``b`` of the same samples, a *positive flip* is a
sample ``a`` gets wrong and ``b`` gets right, a *negative flip* one ``a`` gets right and ``b``
wrong (``get_flips`` in the authors' ``distillation/flip_study.py``). Three comparisons matter:

* initial student -> teacher: the positive flips are the teacher's **complementary knowledge**
  (samples only the teacher gets right), the paper's measure of what there is to transfer;
* initial student -> transferred student: the positive flips are the **knowledge gain**, the
  negative flips the **knowledge loss** (what the student forgot); their difference is the
  **transfer delta** (accuracy after minus before, the paper's Delta_transf);
* of the complementary samples, the share the transferred student now gets right: how much of
  what the teacher alone knew arrived. (The authors' ``transfer_rate`` counts gains per class over
  the classes holding the teacher's positive flips; this per-sample share is our simplification.)

All figures are fractions of the samples (0..1), as brickwork's accuracies are.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import Tensor

from brickwork.errors import BrickworkError


@dataclass(frozen=True)
class Flips:
    """Positive and negative flips from predictions ``a`` to predictions ``b`` (fractions of samples)."""

    positive: float
    negative: float


def flips(a: Tensor, b: Tensor, y: Tensor) -> Flips:
    """Flips from predictions ``a`` (N,) to predictions ``b`` (N,) against labels ``y`` (N,).

    Raises:
        BrickworkError: the three are not 1-D of one length, or empty.
    """
    _check(a=a, b=b, y=y)
    right_a, right_b = a == y, b == y
    n = len(y)
    return Flips(int((~right_a & right_b).sum()) / n, int((right_a & ~right_b).sum()) / n)


@dataclass(frozen=True)
class TransferStats:
    """What a knowledge transfer did to a student, measured on held-out samples.

    Attributes:
        samples: how many samples were compared.
        teacher_accuracy: the teacher's accuracy.
        accuracy_before: the student's accuracy before the transfer.
        accuracy_after: the student's accuracy after it.
        transfer_delta: ``accuracy_after - accuracy_before`` (Delta_transf).
        knowledge_gain: positive flips from the student before to after (wrong -> right).
        knowledge_loss: negative flips from before to after (right -> wrong): what it forgot.
        complementary: positive flips from the student before to the teacher: samples only the
            teacher got right, the knowledge there was to transfer.
        complementary_left: samples the teacher gets right and the transferred student still
            gets wrong.
        transferred_share: of the ``complementary`` samples, the share the student now gets
            right (NaN when there were none).
    """

    samples: int
    teacher_accuracy: float
    accuracy_before: float
    accuracy_after: float
    transfer_delta: float
    knowledge_gain: float
    knowledge_loss: float
    complementary: float
    complementary_left: float
    transferred_share: float

    def as_dict(self) -> dict[str, float]:
        """The fields as a flat dict (for metrics and report rows)."""
        return {k: float(v) for k, v in asdict(self).items()}


def transfer_stats(before: Tensor, after: Tensor, teacher: Tensor, y: Tensor) -> TransferStats:
    """Transfer statistics from class predictions (N,) of the student before and after, and of the teacher.

    Raises:
        BrickworkError: the predictions and labels are not 1-D of one length, or empty.
    """
    _check(before=before, after=after, teacher=teacher, y=y)
    n = len(y)
    right_0, right_1, right_t = before == y, after == y, teacher == y
    own = flips(before, after, y)
    only_teacher = right_t & ~right_0
    count = int(only_teacher.sum())
    acc_0, acc_1 = int(right_0.sum()) / n, int(right_1.sum()) / n  # exact counts, no float32 mean
    return TransferStats(
        samples=n,
        teacher_accuracy=int(right_t.sum()) / n,
        accuracy_before=acc_0,
        accuracy_after=acc_1,
        transfer_delta=acc_1 - acc_0,
        knowledge_gain=own.positive,
        knowledge_loss=own.negative,
        complementary=count / n,
        complementary_left=int((right_t & ~right_1).sum()) / n,
        transferred_share=int((only_teacher & right_1).sum()) / count if count else float("nan"),
    )


def _check(**preds: Tensor) -> None:
    shapes = {k: tuple(v.shape) for k, v in preds.items()}
    lengths = {s[0] if len(s) == 1 else None for s in shapes.values()}
    if len(lengths) != 1 or None in lengths or 0 in lengths:
        raise BrickworkError(
            f"prediction flips: expected non-empty 1-D predictions and labels of one length; got {shapes}"
        )
