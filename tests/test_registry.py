import subprocess
import sys
from typing import Annotated, Literal

import pytest
from pydantic import Field

from brickwork.errors import ConfigError
from brickwork.experiment.builtins import builtin_modules, load_builtins
from brickwork.registry import KINDS, REGISTRY, Entry, Registry

load_builtins()


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


def _fresh(code: str) -> str:
    """Run ``code`` in a new interpreter (no module loaded by other tests) and return its stdout."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_the_registry_loads_nothing_by_itself():
    # Registration comes from the top: a bare registry is empty, and a lookup reports the name
    # as unknown rather than importing the layers above it.
    out = _fresh(
        "import sys\n"
        "from brickwork.registry import REGISTRY\n"
        "print(REGISTRY.names('model'), sorted(m for m in sys.modules if m.startswith('brickwork')))"
    )
    assert out == "[] ['brickwork', 'brickwork._version', 'brickwork.errors', 'brickwork.registry']"


def test_load_builtins_misses_no_registered_entry():
    # What load_builtins registers equals what importing every module of brickwork registers,
    # so no entry defined anywhere is reachable only by importing its module by hand.
    out = _fresh(
        "import importlib, pkgutil, brickwork\n"
        "from brickwork.experiment.builtins import load_builtins\n"
        "from brickwork.registry import REGISTRY\n"
        "load_builtins()\n"
        "before = sorted((e.kind, e.name) for e in REGISTRY.list())\n"
        "for m in pkgutil.walk_packages(brickwork.__path__, 'brickwork.'):\n"
        "    if m.name != 'brickwork.__main__': importlib.import_module(m.name)\n"
        "after = sorted((e.kind, e.name) for e in REGISTRY.list())\n"
        "print(len(before), before == after)"
    )
    count, same = out.split()
    assert same == "True" and int(count) > 50


def test_importing_experiment_loads_the_builtins():
    out = _fresh(
        "import brickwork.experiment\n"
        "from brickwork.registry import REGISTRY\n"
        "print(all(REGISTRY.names(k) for k in ('brick', 'model', 'dataset', 'loss', 'optimizer', 'op', 'stage')))"
    )
    assert out == "True"


def test_builtin_modules_cover_every_layer_that_registers():
    mods = builtin_modules()
    for package in ("brickwork.nn", "brickwork.data", "brickwork.models", "brickwork.train", "brickwork.ops"):
        assert package in mods
    assert "brickwork.experiment.stages.core" in mods and "brickwork.nn.routing.topk" in mods
    assert not [m for m in mods if m.startswith(("brickwork.bench", "brickwork.verbs", "brickwork.cli"))]


def test_a_lookup_below_experiment_finds_its_own_entries():
    # load_dataset lives in brickwork.data and must not need the layers above it.
    out = _fresh(
        "import sys\n"
        "from brickwork.data import load_dataset\n"
        "upper = [m for m in sys.modules if m.startswith('brickwork.experiment')]\n"
        "print(load_dataset('digits', seed=0).in_shape, upper)"
    )
    assert out == "(1, 8, 8) []"
