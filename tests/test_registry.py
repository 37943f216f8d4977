from typing import Annotated, Literal

import pytest
from pydantic import Field

from brickwork.errors import ConfigError
from brickwork.registry import KINDS, REGISTRY, Entry, Registry


def test_builtin_kinds_are_populated():
    for kind in ("brick", "model", "dataset", "loss", "optimizer", "stage"):
        assert REGISTRY.names(kind), kind
    assert set(KINDS) >= {"brick", "model", "dataset", "router", "loss", "optimizer", "op", "stage"}


def test_list_filters_by_glob():
    names = [e.name for e in REGISTRY.list("model", "mlp*")]
    assert names == ["mlp", "mlp-small", "mlp-tiny"]
    assert all(e.kind == "model" for e in REGISTRY.list("model"))


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ConfigError) as e:
        REGISTRY.get("model", "mlp-tnyi", path="models.a.name")
    msg = str(e.value)
    assert "models.a.name" in msg and "'mlp-tnyi'" in msg and "mlp-tiny" in msg


def test_params_hide_injected_and_positional_only_args():
    params = [p.name for p in REGISTRY.get("model", "mlp").params()]
    assert "in_shape" not in params and "num_classes" not in params
    assert params[:2] == ["width", "depth"]
    stage = [p.name for p in REGISTRY.get("stage", "train").params()]
    assert "ctx" not in stage and "epochs" in stage


def test_describe_shows_constraints():
    def f(width: Annotated[int, Field(ge=1)] = 3) -> None: ...

    (p,) = Entry("brick", "f", f, "").params()
    assert p.describe() == "width: int (>= 1) = 3"


def test_describe_shows_nested_constraints_readably():
    def f(
        cap: Annotated[float, Field(gt=0)] | None = None,
        weights: list[Annotated[float, Field(ge=0)]] | None = None,
        mode: Literal["a", "b"] = "a",
    ) -> None: ...

    assert [p.describe() for p in Entry("brick", "f", f, "").params()] == [
        "cap: float (> 0) | None = None",
        "weights: list[float (>= 0)] | None = None",
        "mode: Literal['a', 'b'] = 'a'",
    ]


def test_double_registration_of_a_different_object_fails():
    reg = Registry()
    reg.add(Entry("loss", "x", lambda: 1, ""))
    with pytest.raises(ValueError, match="registered twice"):
        reg.add(Entry("loss", "x", lambda: 2, ""))
