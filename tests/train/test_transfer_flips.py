"""Prediction flips and transfer statistics (Roth et al., 2024) against hand counts."""

import math

import pytest
import torch

from brickwork.errors import BrickworkError
from brickwork.train.distill.flips import Flips, flips, transfer_stats


def test_flips_count_by_hand():
    y = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    a = torch.tensor([0, 1, 2, 9, 9, 9, 6, 9])  # right at 0, 1, 2, 6
    b = torch.tensor([0, 9, 2, 3, 4, 9, 9, 8])  # right at 0, 2, 3, 4
    f = flips(a, b, y)
    assert f.positive == 2 / 8  # 3, 4: a wrong, b right
    assert f.negative == 2 / 8  # 1, 6: a right, b wrong (7 stays wrong, though b changed its answer)


def test_transfer_stats_by_hand():
    y = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    before = torch.tensor([0, 1, 2, 3, 4, 0, 0, 0, 0, 0])  # right at 0..4 (0 also right)
    teacher = torch.tensor([0, 1, 0, 0, 4, 5, 6, 7, 0, 0])  # right at 0, 1, 4, 5, 6, 7
    after = torch.tensor([0, 1, 2, 0, 4, 5, 6, 0, 0, 9])  # right at 0, 1, 2, 4, 5, 6, 9
    s = transfer_stats(before, after, teacher, y)
    assert s.samples == 10
    assert s.accuracy_before == 0.5 and s.accuracy_after == 0.7 and s.teacher_accuracy == 0.6
    assert s.transfer_delta == pytest.approx(0.2, abs=1e-12)
    assert s.knowledge_gain == 0.3  # 5, 6, 9
    assert s.knowledge_loss == 0.1  # 3 forgotten
    assert s.transfer_delta == pytest.approx(s.knowledge_gain - s.knowledge_loss, abs=1e-12)
    assert s.complementary == 0.3  # only the teacher: 5, 6, 7
    assert s.complementary_left == 0.1  # 7
    assert s.transferred_share == 2 / 3  # 5 and 6 of 5, 6, 7


def test_transfer_stats_identities_on_random_predictions():
    g = torch.Generator().manual_seed(0)
    y, before, after, teacher = (torch.randint(0, 4, (500,), generator=g) for _ in range(4))
    s = transfer_stats(before, after, teacher, y)
    assert s.transfer_delta == pytest.approx(s.knowledge_gain - s.knowledge_loss, abs=1e-12)
    # the teacher's positive flips over the student's are its accuracy minus the shared right answers
    both = int(((teacher == y) & (before == y)).sum()) / len(y)
    assert s.complementary == pytest.approx(s.teacher_accuracy - both, abs=1e-12)
    # swapping before and after swaps gain and loss
    r = transfer_stats(after, before, teacher, y)
    assert (r.knowledge_gain, r.knowledge_loss) == (s.knowledge_loss, s.knowledge_gain)


def test_no_complementary_knowledge_gives_nan_share():
    y = torch.tensor([0, 1, 2])
    s = transfer_stats(y.clone(), y.clone(), torch.tensor([2, 2, 2]), y)
    assert s.complementary == 0.0 and math.isnan(s.transferred_share)


def test_mismatched_predictions_are_refused_with_shapes():
    with pytest.raises(BrickworkError, match=r"\(3,\).*\(4,\)"):
        flips(torch.zeros(3), torch.zeros(4), torch.zeros(3))
    with pytest.raises(BrickworkError, match=r"'y': \(4,\)"):  # the labels are checked too
        flips(torch.zeros(3), torch.zeros(3), torch.zeros(4))
    with pytest.raises(BrickworkError, match="non-empty 1-D"):
        transfer_stats(torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 2))


@pytest.mark.parametrize("wrong", ["before", "after", "teacher", "y"])
def test_transfer_stats_checks_each_of_its_four_inputs(wrong):
    preds = {k: torch.zeros(3, dtype=torch.long) for k in ("before", "after", "teacher", "y")}
    preds[wrong] = torch.zeros(4, dtype=torch.long)  # a length the others do not have
    with pytest.raises(BrickworkError, match=rf"'{wrong}': \(4,\)"):
        transfer_stats(**preds)


def test_transfer_stats_as_dict_is_every_field_as_a_float():
    y = torch.tensor([0, 1, 2, 3])
    s = transfer_stats(torch.tensor([0, 1, 0, 0]), torch.tensor([0, 1, 2, 0]), torch.tensor([0, 0, 2, 3]), y)
    d = s.as_dict()
    assert list(d) == [
        "samples",
        "teacher_accuracy",
        "accuracy_before",
        "accuracy_after",
        "transfer_delta",
        "knowledge_gain",
        "knowledge_loss",
        "complementary",
        "complementary_left",
        "transferred_share",
    ]
    assert all(type(v) is float for v in d.values())
    assert d["samples"] == 4.0 and d["teacher_accuracy"] == 0.75 and d["transferred_share"] == 0.5


def test_a_single_sample_is_enough():
    y = torch.tensor([2])
    assert flips(torch.tensor([1]), y.clone(), y) == Flips(1.0, 0.0)
    assert transfer_stats(torch.tensor([1]), y.clone(), y.clone(), y).transferred_share == 1.0
