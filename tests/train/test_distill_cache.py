"""Teacher caching: the same training as a live teacher, bit for bit; refused where it would not be."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from brickwork.data.base import Split
from brickwork.errors import BrickworkError, CheckpointError
from brickwork.models import cnn, mlp, moe_mlp
from brickwork.nn.routing import MoESettings
from brickwork.train.distill import Distiller, Tap, Term, build_cache, check_cacheable, frozen_teacher
from brickwork.train.distill.objective import teacher_taps
from brickwork.train.loop import FitConfig, fit
from brickwork.train.losses import build_loss

IMG = (1, 8, 8)
TERMS = {
    "kd": Term(loss="logit_kd", args={"temperature": 4.0, "alpha": 0.5, "beta": 0.5}),
    "hint": Term(
        loss="hint", student="head.proj", student_io="input", teacher="head.proj", teacher_io="input", adapter=True
    ),
}


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(96, *IMG, generator=g), torch.randint(0, 10, (96,), generator=g)


def _teacher() -> torch.nn.Module:
    torch.manual_seed(0)
    t = cnn(IMG, 10, channels=(4, 8))  # batch norm: in eval mode its running statistics are used
    with torch.no_grad():
        t(torch.randn(32, *IMG))  # move the running statistics away from (0, 1)
    return frozen_teacher(t)


def _distil(teacher: torch.nn.Module, cached: bool, file: Path | None = None) -> dict[str, torch.Tensor]:
    x, y = _data()
    torch.manual_seed(1)
    student = mlp(IMG, 10, width=16)
    cache = build_cache(teacher, teacher_taps(TERMS), x, batch_size=40, file=file) if cached else None
    d = Distiller(student, teacher, TERMS, y, x[:8], cache=cache)
    opt = torch.optim.AdamW(d.parameters(), lr=1e-2)
    cfg = FitConfig(epochs=2, batch_size=16, seed=3)
    fit(d, Split(x, torch.arange(len(x))), Split(x[:0], y[:0]), build_loss("cross_entropy"), opt, cfg, progress=False)
    return d.state_dict()


def test_cached_and_live_teachers_give_bit_identical_weights(tmp_path: Path) -> None:
    teacher = _teacher()
    live = _distil(teacher, cached=False)
    for cached in (_distil(teacher, cached=True), _distil(teacher, cached=True, file=tmp_path / "t")):
        assert live.keys() == cached.keys()
        assert all(torch.equal(live[k], cached[k]) for k in live)
    # the file is read back (not recomputed) and still gives the same weights
    assert (tmp_path / "t.safetensors").exists()
    again = _distil(teacher, cached=True, file=tmp_path / "t")
    assert all(torch.equal(live[k], again[k]) for k in live)
    # and the training did something: the student moved from its initialisation
    torch.manual_seed(1)
    init = mlp(IMG, 10, width=16).state_dict()
    assert not torch.equal(init["head.proj.weight"], live["student.head.proj.weight"])


def test_a_cache_file_of_another_teacher_is_refused(tmp_path: Path) -> None:
    x, _ = _data()
    teacher = _teacher()
    build_cache(teacher, [Tap()], x, file=tmp_path / "c")
    other = frozen_teacher(cnn(IMG, 10, channels=(4, 8)))
    with pytest.raises(CheckpointError, match="teacher cache .*teacher_sha256.*another run"):
        build_cache(other, [Tap()], x, file=tmp_path / "c")
    with pytest.raises(CheckpointError, match="data_sha256"):
        build_cache(teacher, [Tap()], x + 1, file=tmp_path / "c")


def test_caching_is_refused_where_it_would_change_training() -> None:
    x, _ = _data()
    teacher = _teacher()
    with pytest.raises(BrickworkError, match="change every epoch"):
        check_cacheable(teacher, [Tap()], x[:8], augmented=True)
    teacher.train()  # batch norm on batch statistics: a row's output depends on its batch
    with pytest.raises(BrickworkError, match="training mode"):
        check_cacheable(teacher, [Tap()], x[:8])
    torch.manual_seed(0)
    chooser = frozen_teacher(
        moe_mlp(IMG, 10, width=16, hidden=16, num_experts=4, routing=MoESettings(router="expert_choice"))
    )
    with pytest.raises(BrickworkError, match="depends on the other samples in its batch.*cache: none"):
        check_cacheable(chooser, [Tap()], x[:16])
    topk = frozen_teacher(moe_mlp(IMG, 10, width=16, hidden=16, num_experts=4))
    check_cacheable(topk, [Tap()], x[:16])  # token choice without capacity: per-sample, cacheable


class _Centred(torch.nn.Module):
    """A teacher whose rows depend on the whole batch: each row minus the batch mean."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(0, keepdim=True)


def test_refusals_say_why_in_one_line() -> None:
    x, _ = _data()
    teacher = _teacher()
    with pytest.raises(
        BrickworkError,
        match=r"^teacher cache: the training inputs change every epoch \(augmentation\), so the teacher's outputs "
        r"cannot be computed once; set cache: none$",
    ):
        check_cacheable(teacher, [Tap()], x[:8], augmented=True)
    with pytest.raises(
        BrickworkError, match=r"^teacher cache: the teacher is in training mode; its outputs depend on the batch$"
    ):
        check_cacheable(teacher.train(), [Tap()], x[:8])
    with pytest.raises(
        BrickworkError,
        match=r"^teacher cache: the teacher's <model>:output for a sample depends on the other samples in its batch "
        r"\(batch statistics, expert-choice routing or a capacity limit\), and shuffling changes the batches every "
        r"epoch; set cache: none to run the teacher live$",
    ):
        check_cacheable(_Centred().eval(), [Tap()], torch.randn(16, 3))


def test_a_two_row_probe_is_checked_and_one_row_cannot_be() -> None:
    with pytest.raises(BrickworkError, match="depends on the other samples"):
        check_cacheable(
            _Centred().eval(), [Tap()], torch.tensor([[0.0], [1.0]])
        )  # halves of one row: 0, not -0.5 / 0.5
    check_cacheable(_Centred().eval(), [Tap()], torch.tensor([[1.0]]))  # nothing to compare a single row with


def test_same_tolerates_rounding_but_not_a_dependence() -> None:
    from brickwork.train.distill.cache import _same

    a = torch.linspace(0.5, 2.0, 8)
    assert _same(a, a + 1e-7) and not _same(a, 1.5 * a)


def test_the_digest_covers_shape_and_dtype_not_just_bytes() -> None:
    from brickwork.train.distill.cache import tensor_digest

    x = torch.arange(6, dtype=torch.float32)
    assert tensor_digest([x]) == tensor_digest([x.clone()])
    assert tensor_digest([x]) != tensor_digest([x.reshape(2, 3)])  # the same bytes, another shape
    assert tensor_digest([x]) != tensor_digest([x.view(torch.int32)])  # the same bytes, another dtype


def test_a_cache_file_records_its_binding_and_refuses_other_taps(tmp_path: Path) -> None:
    import json

    from brickwork.train.distill.cache import TeacherCache, cache_binding, model_digest, tensor_digest

    x, _ = _data()
    teacher = _teacher()
    taps = [Tap(), Tap("head.proj", "input")]
    made = build_cache(teacher, taps, x, file=tmp_path / "c")
    meta = json.loads((tmp_path / "c.json").read_text())
    binding = {
        "teacher_sha256": model_digest(teacher),
        "data_sha256": tensor_digest([x]),
        "taps": ["<model>:output", "head.proj:input"],
        "rows": 96,
    }
    assert {k: meta[k] for k in binding} == binding == cache_binding(teacher, taps, x) == made.meta
    read = build_cache(teacher, taps, x, file=tmp_path / "c")  # read back, not recomputed
    assert read.meta == binding and all(torch.equal(read.values[t], made.values[t]) for t in taps)
    with pytest.raises(CheckpointError, match="taps"):
        build_cache(teacher, [Tap()], x, file=tmp_path / "c")
    moved = TeacherCache(made.values, made.meta).to("meta")
    assert moved.meta == binding and all(v.device.type == "meta" for v in moved.values.values())


def test_a_tap_path_holding_the_separator_round_trips(tmp_path: Path) -> None:
    from brickwork.train.distill.cache import TeacherCache

    tap = Tap("a|b", "input")  # module names may hold "|"; the io is after the last one
    cache = TeacherCache({tap: torch.ones(2, 3)}, {"rows": 2})
    cache.save(tmp_path / "c")
    back = TeacherCache.load(tmp_path / "c", {"rows": 2})
    assert list(back.values) == [tap] and torch.equal(back.values[tap], torch.ones(2, 3))
