"""Taps by module path on every reference model, the frozen teacher, adapters and the shape errors."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import pytest
import torch
from torch import nn

from brickwork.errors import BrickworkError
from brickwork.models import cnn, mlp, moe_mlp, nested_mlp, sparse_mlp, transformer_lm, vit
from brickwork.nn.stack import StackModel
from brickwork.train.distill import Distiller, Tap, TapRecorder, Term, adapter, frozen_teacher, module_at
from brickwork.train.distill.taps import FlatProjection

IMG = (1, 8, 8)

REFERENCE: dict[str, Callable[[], StackModel]] = {
    "mlp": lambda: mlp(IMG, 10, width=16),
    "cnn": lambda: cnn(IMG, 10, channels=(4, 8)),
    "vit": lambda: vit(IMG, 10, dim=16, depth=2, heads=2, patch=4),
    "lm": lambda: transformer_lm((12,), 20, dim=16, depth=2, heads=2),
    "moe": lambda: moe_mlp(IMG, 10, width=16, hidden=16, num_experts=4),
    "nested": lambda: nested_mlp(IMG, 10, width=16, depth=2),
    "sparse": lambda: sparse_mlp(IMG, 10, width=32, groups=4),
}


def _inputs(name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if name == "lm":
        return torch.randint(0, 20, (3, 12), generator=g)
    return torch.randn(3, *IMG, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_taps_by_path_equal_the_stack_taps_on_every_reference_model(name: str) -> None:
    torch.manual_seed(0)
    model = REFERENCE[name]().double().eval()
    x = _inputs(name)
    taps = [Tap(""), Tap("body.layers.0", "input"), Tap("body.layers.1"), Tap("head", "input")]
    with torch.no_grad(), TapRecorder(model, taps) as rec:
        out = model(x)
        h0 = model.stem(x)
        h1, last = model.taps(x, [1, -1])  # the index taps: an independent path through the stack
    assert torch.equal(rec.values[Tap("")], out)
    assert torch.equal(rec.values[Tap("body.layers.0", "input")], h0)
    assert torch.equal(rec.values[Tap("body.layers.1")], h1)
    assert torch.equal(rec.values[Tap("head", "input")], last)
    # one pass through run(): the same tensors (the model's output read from the return value)
    before = dict(rec.values)
    with torch.no_grad():
        ran = rec.run(x)
    assert ran.keys() == set(taps) and all(torch.equal(ran[t], before[t]) for t in taps)
    rec.values.update(before)
    # hooks are gone after the block: the next pass records nothing
    rec.values.clear()
    with torch.no_grad():
        model(x)
    assert not rec.values


def test_a_path_that_does_not_exist_names_the_nearest_ones() -> None:
    model = mlp(IMG, 10, width=16)
    with pytest.raises(BrickworkError, match=r"losses.kd.student: .*'body.layer.1'.*'body.layers.1'"):
        module_at(model, "body.layer.1", where="losses.kd.student")
    with pytest.raises(BrickworkError, match=r"'head.projection'.*head.proj"):
        TapRecorder(model, [Tap("head.projection")])


def test_frozen_teacher_stays_in_eval_mode_and_out_of_the_optimizer() -> None:
    torch.manual_seed(0)
    teacher = frozen_teacher(cnn(IMG, 10, channels=(4, 8)))
    student = mlp(IMG, 10, width=16)
    x, y = torch.randn(6, *IMG), torch.randint(0, 10, (6,))
    d = Distiller(student, teacher, {"kd": Term(loss="logit_kd")}, y, x[:4])
    d.train()
    assert student.training and not teacher.training and not any(m.training for m in teacher.modules())
    assert all(not p.requires_grad for p in teacher.parameters())
    ids = {id(p) for p in d.parameters()}
    assert ids == {id(p) for p in student.parameters()}
    assert not any(k.startswith("_teacher") for k in d.state_dict())
    loss = d.training_loss(x, torch.arange(6), lambda a, b: a.sum())
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())


def test_adapter_maps_student_width_to_teacher_width() -> None:
    torch.manual_seed(0)
    teacher = frozen_teacher(mlp(IMG, 10, width=24))
    student = mlp(IMG, 10, width=16)
    x, y = torch.randn(5, *IMG), torch.randint(0, 10, (5,))
    term = Term(loss="hint", student="body.layers.1", teacher="body.layers.1", adapter=True)
    d = Distiller(student, teacher, {"hint": term}, y, x[:2])
    assert isinstance(d.adapters["hint"], nn.Linear) and d.adapters["hint"].weight.shape == (24, 16)
    assert {id(p) for p in d.adapters.parameters()} <= {id(p) for p in d.parameters()}
    # the objective is the hint loss of the adapted student features, exactly
    with torch.no_grad():
        s = d.adapters["hint"](student.taps(x, [1])[0])
        t = teacher.taps(x, [1])[0]
        assert torch.equal(d.training_loss(x, torch.arange(5), lambda a, b: a.sum()), (s - t).pow(2).mean())
    assert isinstance(adapter((4, 8, 8), (6, 8, 8)), nn.Conv2d)
    flat = adapter((16,), (8, 2, 2))
    assert flat(torch.randn(3, 16)).shape == (3, 8, 2, 2)


@pytest.mark.parametrize(
    ("student", "teacher", "kind"),
    [
        ((4, 8, 8), (6, 8, 8), nn.Conv2d),  # feature maps of one size: 1x1 convolution over channels
        ((5, 16), (5, 24), nn.Linear),  # (B, T, D): a Linear on the last dim
        ((16,), (24,), nn.Linear),
        ((3, 4), (5, 6), FlatProjection),  # the same rank, but more than the last dim differs
        ((4, 8, 8), (6, 4, 4), FlatProjection),
    ],
)
def test_adapter_maps_the_student_shape_onto_the_teacher_shape(student, teacher, kind) -> None:
    a = adapter(student, teacher)
    assert type(a) is kind
    assert a(torch.randn(2, *student)).shape == (2, *teacher)
    if kind is nn.Conv2d:
        assert a.weight.shape == (6, 4, 1, 1)


def test_shape_mismatch_without_adapter_names_paths_and_shapes() -> None:
    teacher = frozen_teacher(mlp(IMG, 10, width=24))
    x, y = torch.randn(4, *IMG), torch.randint(0, 10, (4,))
    term = Term(loss="hint", student="body.layers.1", teacher="body.layers.0")
    with pytest.raises(
        BrickworkError,
        match=r"losses.h: student body.layers.1:output \(2, 16\), teacher body.layers.0:output \(2, 24\).*adapter",
    ):
        Distiller(mlp(IMG, 10, width=16), teacher, {"h": term}, y, x[:2])


def test_logit_kd_from_a_teacher_of_another_output_space_is_refused() -> None:
    teacher = frozen_teacher(mlp(IMG, 7, width=16))
    x, y = torch.randn(4, *IMG), torch.randint(0, 10, (4,))
    with pytest.raises(
        BrickworkError, match=r"losses.kd: student <model>:output \(2, 10\), teacher <model>:output \(2, 7\)"
    ):
        Distiller(mlp(IMG, 10, width=16), teacher, {"kd": Term(loss="logit_kd")}, y, x[:2])


def test_a_bad_teacher_path_is_refused_before_training() -> None:
    teacher = frozen_teacher(mlp(IMG, 10, width=16))
    x, y = torch.randn(4, *IMG), torch.randint(0, 10, (4,))
    term = Term(loss="hint", student="body.layers.1", teacher="body.layers.9")
    with pytest.raises(BrickworkError, match=r"losses.h.teacher: .*'body.layers.9'"):
        Distiller(mlp(IMG, 10, width=16), teacher, {"h": term}, y, x[:2])


def _nested() -> nn.Module:
    layers = nn.Sequential(*[nn.Linear(2, 2) for _ in range(7)])
    return nn.Sequential(OrderedDict(enc=nn.Sequential(OrderedDict(layers=layers)), head=nn.Linear(2, 2)))


@pytest.mark.parametrize(
    ("path", "nearest"),
    [
        ("enc.layers.9", "['enc.layers.6', 'enc.layers.5', 'enc.layers.4']"),  # the three closest names
        ("hxxd", "['head']"),  # close enough (ratio 0.5)
        ("enc.layers." + "q" * 50, "['enc.layers.0', 'enc.layers.1', 'enc.layers.2', 'enc.layers.3', 'enc.layers.4']"),
        ("enc.nothere." + "q" * 50, "['enc.layers']"),  # the children of the deepest existing prefix
        (
            "enc.layers.nothere." + "q" * 50,
            "['enc.layers.0', 'enc.layers.1', 'enc.layers.2', 'enc.layers.3', 'enc.layers.4']",
        ),
        ("q" * 50, "['enc', 'head']"),  # no prefix: the model's children
        ("nothere." + "q" * 50, "['enc', 'head']"),  # a first component that does not exist either
    ],
)
def test_a_bad_path_names_the_nearest_existing_ones(path: str, nearest: str) -> None:
    message = f"tap: Sequential has no module at path {path!r}; nearest existing paths: {nearest}"
    with pytest.raises(BrickworkError) as e:
        module_at(_nested(), path)
    assert str(e.value) == message
    with pytest.raises(BrickworkError) as e:
        TapRecorder(_nested(), [Tap(path)])  # the recorder's default prefix is the same
    assert str(e.value) == message


class _Returns(nn.Module):
    def __init__(self, value: object) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor) -> object:
        return self.value


@pytest.mark.parametrize("value", [{"a": torch.ones(1)}, (1, 2), []], ids=["dict", "tuple-of-ints", "empty"])
def test_a_tap_that_is_no_tensor_is_refused(value: object) -> None:
    with pytest.raises(
        BrickworkError, match=rf"^tap: expected a tensor \(or a tuple starting with one\), got {type(value).__name__}$"
    ):
        TapRecorder(_Returns(value), [Tap()]).run(torch.ones(1))
