"""The distillation objective: the weighted sum of its terms by hand, labels and teacher tensors looked up
by row, a cache standing in for the teacher, and the refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from brickwork.errors import BrickworkError
from brickwork.train.distill import Distiller, Tap, Term, build_cache, frozen_teacher, hint, logit_kd
from brickwork.train.distill.objective import teacher_taps

TERMS = {
    "kd": Term(loss="logit_kd", weight=0.3, args={"temperature": 2.0, "alpha": 0.0, "beta": 1.0}),
    "labels": Term(loss="labels", weight=2.0),
    "hint": Term(loss="hint", student="0", teacher="0", adapter=True),  # weight 1.0
}


def _models() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    teacher = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    return student, frozen_teacher(teacher)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(10, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (10,), generator=g)


def test_the_objective_is_the_weighted_sum_of_its_terms_on_the_batch_rows() -> None:
    student, teacher = _models()
    x, y = _data()
    d = Distiller(student, teacher, TERMS, y, x[:4])
    rows = torch.tensor([7, 2, 9, 0])
    xb, yb = x[rows], y[rows]
    got = d.training_loss(xb, rows, F.cross_entropy)
    s, t = student(xb), teacher(xb)
    want = 0.3 * logit_kd(s, t, yb, 2.0, 0.0, 1.0) + 2.0 * F.cross_entropy(s, yb)
    want = want + hint(d.adapters["hint"](student[0](xb)), teacher[0](xb))
    assert abs(got.item() - want.item()) < 1e-12
    assert "labels" not in d.state_dict()  # a saved state holds the student and the adapters only
    assert set(d.state_dict()) == {f"student.{k}" for k in student.state_dict()} | {
        f"adapters.hint.{k}" for k in ("weight", "bias")
    }


def test_a_cache_stands_in_for_the_teacher_by_row() -> None:
    student, teacher = _models()
    x, y = _data()
    live = Distiller(student, teacher, TERMS, y, x[:4])
    cache = build_cache(teacher, teacher_taps(TERMS), x)
    cached = Distiller(student, None, TERMS, y, x[:4], cache=cache)  # no teacher at all
    cached.adapters.load_state_dict(live.adapters.state_dict())
    rows = torch.tensor([3, 8, 1])
    a = live.training_loss(x[rows], rows, F.cross_entropy)
    b = cached.training_loss(x[rows], rows, F.cross_entropy)
    assert abs(a.item() - b.item()) < 1e-12
    with pytest.raises(
        BrickworkError, match=r"^distill: the teacher cache needs row indices and there is no live teacher$"
    ):
        cached.teacher_tensors(x[rows])


def test_refusals() -> None:
    student, teacher = _models()
    x, y = _data()
    with pytest.raises(BrickworkError, match=r"^distill: no loss terms; name at least one under losses:$"):
        Distiller(student, teacher, {}, y, x[:4])
    with pytest.raises(BrickworkError, match=r"^distill: a teacher or a teacher cache is needed$"):
        Distiller(student, None, TERMS, y, x[:4])
    bad = {"h": Term(loss="hint", student="nowhere", teacher="0", adapter=True)}
    with pytest.raises(BrickworkError, match=r"^losses\.h\.student: Sequential has no module at path 'nowhere'"):
        Distiller(student, teacher, bad, y, x[:4])
    with pytest.raises(ValueError, match="unknown distill_loss name"):
        Term(loss="nope")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="valid number"):
        Term(loss="logit_kd", args={"temperature": "4"})  # strict: a string is not a number


def test_the_labels_term_reads_no_teacher_tap() -> None:
    student, teacher = _models()
    x, y = _data()
    terms = {"labels": Term(loss="labels", teacher="nowhere")}  # its teacher path is never looked at
    assert teacher_taps(terms) == []
    assert teacher_taps({**terms, "kd": Term(loss="logit_kd", teacher="2")}) == [Tap("2")]
    d = Distiller(student, teacher, terms, y, x[:4])
    assert (
        abs(d.training_loss(x, torch.arange(10), F.cross_entropy).item() - F.cross_entropy(student(x), y).item())
        < 1e-12
    )
