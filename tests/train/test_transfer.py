"""Data-partitioned knowledge transfer (Roth et al., 2024): the partition and the objective by hand."""

import math
import re

import pytest
import torch
from torch import nn

from brickwork.data.base import Split
from brickwork.data.batching import epoch_order
from brickwork.errors import BrickworkError
from brickwork.train.distill.objective import Term
from brickwork.train.distill.transfer import (
    TeacherAndSelf,
    partitioned_kd,
    partitioned_targets,
    teacher_mask,
    transfer,
    transfer_terms,
)
from brickwork.train.recipe import TrainSettings, train_with


def _softmax_row(row: list[float]) -> list[float]:
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def test_supervised_partition_compares_true_class_probabilities_by_hand():
    t = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [3.0, 0.0, 1.0]], dtype=torch.float64)
    s = torch.tensor([[0.0, 1.0, 0.0], [0.0, 3.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 4.0]], dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 2])
    expect = [_softmax_row(t[i].tolist())[y[i]] > _softmax_row(s[i].tolist())[y[i]] for i in range(4)]
    assert expect == [True, False, False, False]  # row 2 is a tie (uniform both): the student's own self
    assert teacher_mask(t, s, y, "supervised").tolist() == expect
    # the teacher is chosen by confidence in the label, not by being right: row 3's teacher
    # predicts class 0 and is still less confident in class 2 than the student
    y2 = torch.tensor([0, 1, 2, 0])
    assert teacher_mask(t, s, y2, "supervised").tolist() == [True, False, False, True]


def test_unsupervised_partition_compares_largest_probabilities():
    t = torch.tensor([[2.0, 0.0], [0.0, 0.5], [1.0, 1.0]], dtype=torch.float64)
    s = torch.tensor([[0.0, 1.0], [3.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    expect = [max(_softmax_row(t[i].tolist())) > max(_softmax_row(s[i].tolist())) for i in range(3)]
    assert teacher_mask(t, s, None, "unsupervised").tolist() == expect == [True, False, False]


def test_partition_is_invariant_to_logit_shifts_and_picks_rows():
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(64, 5, generator=g, dtype=torch.float64), torch.randn(64, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (64,), generator=g)
    shift = torch.randn(64, 1, generator=g, dtype=torch.float64)
    for rule in ("supervised", "unsupervised"):
        m = teacher_mask(t, s, y, rule)
        assert torch.equal(m, teacher_mask(t + shift, s - 3 * shift, y, rule))  # softmax ignores shifts
        assert not teacher_mask(s, s, y, rule).any()  # the student against itself: always its own self
        target = partitioned_targets(t, s, m)
        assert torch.equal(target[m], t[m]) and torch.equal(target[~m], s[~m])


def test_partition_refuses_bad_shapes_and_missing_labels():
    t, s = torch.zeros(4, 3), torch.zeros(4, 5)
    with pytest.raises(BrickworkError, match=r"\(4, 3\) and \(4, 5\)"):
        teacher_mask(t, s, torch.zeros(4), "supervised")
    with pytest.raises(BrickworkError, match=r"labels must be \(4,\); got None"):
        teacher_mask(t, t, None, "supervised")


def _kl_by_hand(student: list[float], target: list[float], tau: float) -> float:
    p_t = _softmax_row([v / tau for v in target])
    p_s = _softmax_row([v / tau for v in student])
    return sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s, strict=True))


@pytest.mark.parametrize("rule", ["supervised", "unsupervised"])
def test_partitioned_kd_equals_a_hand_computation(rule):
    g = torch.Generator().manual_seed(1)
    s, t, own = (torch.randn(6, 4, generator=g, dtype=torch.float64) for _ in range(3))
    y = torch.randint(0, 4, (6,), generator=g)
    tau = 2.5
    value = partitioned_kd(s, torch.stack([t, own], 1), y, tau, rule)
    mask = teacher_mask(t, own, y, rule)
    assert 0 < int(mask.sum()) < 6  # both teachers teach some rows, so a swap of the two is caught
    hand = 0.0
    for i in range(6):
        target = t[i] if mask[i] else own[i]
        hand += _kl_by_hand(s[i].tolist(), target.tolist(), tau)
    assert abs(value.item() - tau**2 * hand / 6) < 1e-10


def test_partitioned_kd_refuses_a_plain_teacher_tensor():
    with pytest.raises(BrickworkError, match=r"\(B, 2, K\).*\(3, 4\)"):
        partitioned_kd(torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(3), 1.0, "supervised")


def _data(n: int = 48) -> tuple[Split, Split]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return Split(x, y), Split(x[:16], y[:16])


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))


class Uniform(nn.Module):
    """A teacher that knows nothing: zero logits, the uniform distribution over 3 classes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(x), 3)


# SGD, not Adam: Adam divides by the gradient's own scale, so a KL to an identical distribution
# (zero up to float rounding, ~1e-8) would still take steps of size lr.
SETTINGS = TrainSettings(epochs=2, batch_size=16, optimizer="sgd", lr=0.5, weight_decay=0.0, schedule="constant")


def test_a_teacher_never_more_confident_teaches_nothing_under_partitioning():
    """A uniform teacher's largest probability (1/K) never beats the student's, so the unsupervised
    partition gives every sample to the student's initial self: KL to itself, a zero gradient (up
    to rounding), the student stays where it was. Plain KL to the same teacher moves it."""
    train, val = _data()
    student = _mlp(0)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    transfer(student, Uniform(), train, val, "kl_dp_unsup", SETTINGS, seed=0)
    kept = max(float((v - student.state_dict()[k]).abs().max()) for k, v in before.items())
    moved = _mlp(0)
    transfer(moved, Uniform(), train, val, "kl", SETTINGS, seed=0)
    change = max(float((v - moved.state_dict()[k]).abs().max()) for k, v in before.items())
    assert kept < 1e-6 and change > 1e-2, (kept, change)


def test_one_transfer_step_equals_a_hand_written_step():
    """transfer(kl_dp) = the loop's step on partitioned_kd against the frozen teacher and initial self."""
    train, val = _data(16)
    teacher, student = _mlp(1), _mlp(2)
    settings = TrainSettings(epochs=1, batch_size=16, optimizer="sgd", lr=0.1, weight_decay=0.0, schedule="constant")
    by_hand = _mlp(2)
    own = _mlp(2).eval()
    opt = torch.optim.SGD(by_hand.parameters(), lr=0.1, momentum=0.9)
    order = epoch_order(len(train), 0, 0)
    x, y = train.x[order], train.y[order]
    with torch.no_grad():
        pair = torch.stack([teacher(x), own(x)], 1)
    partitioned_kd(by_hand(x), pair, y, 2.0, "supervised").backward()
    opt.step()
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    transfer(student, teacher, train, val, "kl_dp", settings, seed=0, temperature=2.0, cache=False)
    for (k, a), b in zip(student.state_dict().items(), by_hand.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-7, rtol=0), k
    assert not torch.equal(student[0].weight, _mlp(2)[0].weight)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in t_before.items())  # the teacher is frozen
    assert not any(p.requires_grad for p in teacher.parameters())


def test_transfer_terms_name_registered_losses():
    assert transfer_terms("kl", 2.0)["kl"].args == {"temperature": 2.0, "alpha": 0.0, "beta": 1.0}
    xekl = transfer_terms("xekl", 1.0, 0.9)["xekl"].args
    assert xekl == pytest.approx({"temperature": 1.0, "alpha": 0.1, "beta": 0.9})
    assert transfer_terms("kl_dp_unsup")["kl_dp"].args["rule"] == "unsupervised"


@pytest.mark.parametrize("method", ["kl_dp", "xekl"])
def test_cached_and_live_teachers_give_the_same_student(method):
    """The same up to float rounding: the cache runs the teacher on whole chunks, live on shuffled batches."""
    train, val = _data()
    a, b = _mlp(2), _mlp(2)
    transfer(a, _mlp(1), train, val, method, SETTINGS, seed=0, cache=True)
    transfer(b, _mlp(1), train, val, method, SETTINGS, seed=0, cache=False)
    assert all(torch.allclose(v, b.state_dict()[k], atol=1e-6, rtol=0) for k, v in a.state_dict().items())
    assert not torch.allclose(a[0].weight, _mlp(2)[0].weight, atol=1e-3)


def test_refusals_name_the_shapes():
    t = torch.zeros(4, 3)
    with pytest.raises(BrickworkError, match=r"labels must be \(4,\); got \(3,\)$"):
        teacher_mask(t, t, torch.zeros(3), "supervised")
    for pair in (torch.zeros(3, 3, 4), torch.zeros(3, 2)):  # three models, or a plain (B, K) tensor
        with pytest.raises(
            BrickworkError,
            match=r"^kl_dp: the teacher tensor must be \(B, 2, K\) \(the teacher and the student's initial self\); "
            rf"got {re.escape(str(tuple(pair.shape)))}$",
        ):
            partitioned_kd(torch.zeros(3, 4), pair, torch.zeros(3), 1.0, "supervised")
    with pytest.raises(BrickworkError, match=r"^kl_dp: student outputs \(3, 5\) and teacher outputs \(3, 4\)"):
        partitioned_kd(torch.zeros(3, 5), torch.zeros(3, 2, 4), torch.zeros(3), 1.0, "supervised")
    with pytest.raises(
        BrickworkError,
        match=r"^transfer: teacher outputs \(2, 3\) and student outputs \(2, 4\) are not the same output space; "
        "transfer needs two models of the same classes$",
    ):
        TeacherAndSelf(nn.Linear(5, 3), nn.Linear(5, 4))(torch.zeros(2, 5))


def test_transfer_terms_defaults_and_the_labels_control():
    assert transfer_terms("xekl")["xekl"].args == {"temperature": 1.0, "alpha": 0.5, "beta": 0.5}
    assert transfer_terms("kl_dp")["kl_dp"].args == {"temperature": 1.0, "rule": "supervised"}
    assert transfer_terms("labels") == {"labels": Term("labels")}


class Counting(nn.Module):
    """A teacher that counts the rows it is run on (a plain int: kept across ``frozen_teacher``)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.net, self.rows = _mlp(seed), 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows += len(x)
        return self.net(x)


def _teacher_rows(method: str, epochs: int, **kw: object) -> int:
    train, val = _data()
    teacher = Counting(1)
    settings = TrainSettings(epochs=epochs, batch_size=16, optimizer="sgd", lr=0.5, weight_decay=0.0)
    transfer(_mlp(2), teacher, train, val, method, settings, seed=0, **kw)  # type: ignore[arg-type]
    return teacher.rows


def test_the_teacher_runs_once_over_the_data_by_default_and_every_step_without_the_cache():
    assert _teacher_rows("xekl", 1) == _teacher_rows("xekl", 2)  # the cache's one pass, whatever the epochs
    assert _teacher_rows("xekl", 2, cache=False) - _teacher_rows("xekl", 1, cache=False) == 48  # an epoch's rows
    assert _teacher_rows("labels", 2) == 0  # the control never runs the teacher


def test_the_labels_control_is_plain_training_for_as_many_steps():
    train, val = _data()
    a, b = _mlp(2), _mlp(2)
    history = transfer(a, Counting(1), train, val, "labels", SETTINGS, seed=3)
    expected = train_with(b, train, val, SETTINGS, seed=3)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert [r["train_loss"] for r in history] == [r["train_loss"] for r in expected]
    assert [r["val_loss"] for r in history] == [r["val_loss"] for r in expected]


def test_xekl_with_all_weight_on_the_kl_is_kl_dist_at_the_default_temperature(capsys):
    train, val = _data()
    a, b = _mlp(2), _mlp(2)
    transfer(a, _mlp(1), train, val, "kl", SETTINGS, seed=0, progress=True)
    transfer(b, _mlp(1), train, val, "xekl", SETTINGS, seed=0, alpha=1.0, temperature=1.0)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert re.search(r"(^|\r)transfer: ", capsys.readouterr().err)  # the progress bar's default label
