"""Checkpoint loading trusts nothing: each malformed metadata field, each tensor of another dtype kind and
each non-finite value is one exact refusal (tests/test_persist.py covers the file format beneath)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from brickwork.errors import CheckpointError
from brickwork.persist import load_tensors, save_tensors
from brickwork.train.checkpoint import load_model, load_training_state, save_model, save_training_state


def _state(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stem = tmp_path / "state"
    save_training_state(stem, model, opt, {"epoch": 1, "history": []})
    return stem


def _load(stem: Path) -> dict:
    model = torch.nn.Linear(3, 2)
    return load_training_state(stem, model, torch.optim.SGD(model.parameters(), lr=0.1))


def _legacy_edit(stem: Path, edit) -> None:  # type: ignore[no-untyped-def]
    """Edit the JSON as a pre-hash (format 1) file, so that only the structure checks stand in the way."""
    path = stem.with_name(stem.name + ".json")
    meta = json.loads(path.read_text())
    edit(meta)
    meta.pop("meta_sha256", None)
    meta["format"] = 1
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.pop("optimizer"), "the metadata has no 'optimizer'; not a training checkpoint"),
        (lambda m: m.update(optimizer=[]), "metadata optimizer: expected a JSON object, got list []"),
        (
            lambda m: m["optimizer"].update(param_groups="x"),
            "metadata optimizer.param_groups: expected a list, got str 'x'",
        ),
        (lambda m: m["progress"].update(epoch="1"), "metadata progress.epoch: expected an integer, got str '1'"),
        (lambda m: m["progress"].update(epoch=True), "metadata progress.epoch: expected an integer, got bool True"),
        (lambda m: m.update(extra_state=3.5), "metadata extra_state: expected a JSON object, got float 3.5"),
    ],
    ids=["missing", "object", "list", "integer", "bool-is-no-integer", "float"],
)
def test_each_malformed_field_is_one_exact_refusal(tmp_path: Path, edit, message: str) -> None:  # type: ignore[no-untyped-def]
    stem = _state(tmp_path)
    _legacy_edit(stem, edit)
    with pytest.raises(CheckpointError) as e:
        _load(stem)
    assert str(e.value) == f"{stem}: {message}"


def test_a_field_with_a_default_may_be_absent(tmp_path: Path) -> None:
    stem = _state(tmp_path)
    _legacy_edit(stem, lambda m: m.pop("extra_state"))  # older files: no extra state, none needed
    assert _load(stem) == {"epoch": 1, "history": []}


class _Buffers(torch.nn.Module):
    """A parameter, a float threshold that may be inf, a bool mask and an integer count."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2, 3))
        self.register_buffer("limit", torch.zeros(2))
        self.register_buffer("mask", torch.zeros(2, dtype=torch.bool))
        self.register_buffer("count", torch.zeros(2, dtype=torch.int64))


def _resaved(tmp_path: Path, name: str, value: torch.Tensor) -> Path:
    stem = tmp_path / "m"
    save_model(stem, _Buffers())
    tensors, meta = load_tensors(stem)
    for k in ("format", "sha256", "meta_sha256"):
        meta.pop(k)
    tensors[name] = value
    save_tensors(stem, tensors, meta)  # a well-formed file, hashes recomputed
    return stem


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        (
            "w",
            torch.ones(2, 3, dtype=torch.int64),
            "tensor 'w' has dtype torch.int64; expected a floating dtype like torch.float32",
        ),
        ("mask", torch.ones(2), "tensor 'mask' has dtype torch.float32; expected a bool dtype like torch.bool"),
        ("count", torch.ones(2), "tensor 'count' has dtype torch.float32; expected a integer dtype like torch.int64"),
        (
            "count",
            torch.ones(2, dtype=torch.bool),
            "tensor 'count' has dtype torch.bool; expected a integer dtype like torch.int64",
        ),
        (
            "w",
            torch.zeros(6).index_fill(0, torch.tensor([4]), float("inf")).reshape(2, 3),
            "tensor 'w' holds a NaN or infinite value (flat index 4); expected finite",
        ),
        (
            "limit",
            torch.tensor([0.0, float("nan")]),
            "tensor 'limit' holds a NaN value (flat index 1); expected finite",
        ),
    ],
    ids=["int-weight", "float-mask", "float-count", "bool-count", "inf-parameter", "nan-buffer"],
)
def test_a_tensor_of_another_kind_or_not_finite_is_refused(
    tmp_path: Path, name: str, value: torch.Tensor, message: str
) -> None:
    stem = _resaved(tmp_path, name, value)
    with pytest.raises(CheckpointError) as e:
        load_model(stem, _Buffers())
    assert str(e.value) == f"{stem}: {message}"


def test_a_buffer_may_hold_inf_and_other_precisions_of_a_kind_load(tmp_path: Path) -> None:
    stem = _resaved(tmp_path, "limit", torch.tensor([float("inf"), -float("inf")]))  # a threshold, on purpose
    model = _Buffers()
    load_model(stem, model)
    assert model.limit.tolist() == [float("inf"), -float("inf")]
    stem = _resaved(tmp_path, "w", torch.ones(2, 3, dtype=torch.float64))  # the same kind: cast on load
    load_model(stem, model)
    assert torch.equal(model.w, torch.ones(2, 3))


def test_weights_of_another_model_name_what_differs(tmp_path: Path) -> None:
    save_model(tmp_path / "m", torch.nn.Linear(3, 2))
    many = torch.nn.Sequential(*[torch.nn.Linear(3, 2) for _ in range(3)])
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "m", many)
    assert str(e.value) == (
        f"{tmp_path / 'm'}: weights do not match the model (missing ['0.bias', '0.weight', '1.bias', '1.weight', "
        "'2.bias'], unexpected ['bias', 'weight'], shape mismatches []); was it saved from a different config?"
    )
    save_model(tmp_path / "nobias", torch.nn.Linear(3, 2, bias=False))
    with pytest.raises(CheckpointError, match=r"\(missing \['bias'\], unexpected \[\], shape mismatches \[\]\)"):
        load_model(tmp_path / "nobias", torch.nn.Linear(3, 2))  # only missing: still this refusal
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "m", torch.nn.Linear(4, 2))
    assert "(missing [], unexpected [], shape mismatches ['weight: (2, 3) vs (2, 4)'])" in str(e.value)


def test_a_training_state_is_bound_and_needs_its_rng_and_optimizer_objects(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stem = tmp_path / "s"
    save_training_state(stem, model, opt, {"epoch": 1, "history": []}, bind={"seed": 0})
    with pytest.raises(CheckpointError, match="seed"):
        load_training_state(stem, model, opt, expect={"seed": 1})
    for edit, message in [
        (lambda m: m.update(progress=[]), "metadata progress: expected a JSON object, got list []"),
        (lambda m: m["progress"].update(history={}), "metadata progress.history: expected a list, got dict {}"),
        (
            lambda m: m["optimizer"].update(plain_state=[]),
            "metadata optimizer.plain_state: expected a JSON object, got list []",
        ),
        (
            lambda m: m["optimizer"].update(param_groups=[1]),
            "metadata optimizer: expected param_groups and plain_state of JSON objects",
        ),
        (
            lambda m: m["optimizer"].update(plain_state={"0": 1}),
            "metadata optimizer: expected param_groups and plain_state of JSON objects",
        ),
    ]:
        save_training_state(stem, model, opt, {"epoch": 1, "history": []})
        _legacy_edit(stem, edit)
        with pytest.raises(CheckpointError) as e:
            _load(stem)
        assert str(e.value) == f"{stem}: {message}"
    save_training_state(stem, model, opt, {"epoch": 1, "history": []})
    tensors, meta = load_tensors(stem)
    for k in ("format", "sha256", "meta_sha256"):
        meta.pop(k)
    del tensors["rng.torch"]
    save_tensors(stem, tensors, meta)
    with pytest.raises(CheckpointError, match=r"no torch RNG state \('rng.torch', uint8\); not a training checkpoint$"):
        _load(stem)
