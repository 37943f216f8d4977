"""The public API: each package's ``__all__`` imports, has no duplicates, and docs/api.md lists it."""

import importlib
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from brickwork.experiment.builtins import load_builtins
from brickwork.registry import REGISTRY

load_builtins()

PACKAGES = [
    "brickwork",
    "brickwork.nn",
    "brickwork.nn.routing",
    "brickwork.nn.sparse",
    "brickwork.nn.nested",
    "brickwork.kernels",
    "brickwork.ops",
    "brickwork.analysis",
    "brickwork.train",
    "brickwork.data",
    "brickwork.models",
    "brickwork.experiment",
    "brickwork.distributed",
]
API_DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


@pytest.mark.parametrize("package", PACKAGES)
def test_every_name_in_all_imports_once(package):
    mod = importlib.import_module(package)
    names = mod.__all__
    assert len(names) == len(set(names)), sorted({n for n in names if names.count(n) > 1})
    missing = [n for n in names if not hasattr(mod, n)]
    assert not missing, f"{package}.__all__ names what it does not define: {missing}"


def test_nn_exports_the_bricks_people_reach_for():
    import brickwork.nn as bnn

    wanted = {
        "MoE", "moe_ffn", "MixtureOfDepths", "EarlyExit", "ExitGate", "ExitAt", "Stack", "StackModel",
        "collect_records", "collect_aux_losses", "TopKRouter", "ExpertChoiceRouter", "HashRouter",
        "DenseToSparseRouter", "KeyRouter", "MLPRouter", "NestedLinear", "NestedModel", "GroupLinear", "Rewiring",
    }  # fmt: skip
    assert wanted <= set(bnn.__all__), sorted(wanted - set(bnn.__all__))


def _exported(package: str) -> set[int]:
    mod = importlib.import_module(package)
    return {id(getattr(mod, n)) for n in mod.__all__}


def test_every_registered_brick_and_router_class_is_exported_by_nn():
    nn_names = _exported("brickwork.nn")
    anywhere = nn_names | _exported("brickwork.nn.routing") | _exported("brickwork.nn.sparse")
    anywhere |= _exported("brickwork.nn.nested")
    entries = REGISTRY.list("brick") + REGISTRY.list("router")
    classes = [e for e in entries if isinstance(e.obj, type)]
    assert not [e.name for e in classes if id(e.obj) not in nn_names]
    assert not [e.name for e in entries if id(e.obj) not in anywhere]


def test_every_registered_op_is_exported_by_ops():
    ops = _exported("brickwork.ops")
    assert not [e.name for e in REGISTRY.list("op") if id(e.obj) not in ops]


def _documented() -> dict[str, set[str]]:
    """``## `package` `` sections of docs/api.md and the names their list items start with."""
    out: dict[str, set[str]] = {}
    current = None
    for line in API_DOC.read_text().splitlines():
        if m := re.match(r"^## `(brickwork[\w.]*)`", line):
            current = out.setdefault(m.group(1), set())
        elif (m := re.match(r"^- `(\w+)`", line)) and current is not None:
            current.add(m.group(1))
    return out


@pytest.mark.parametrize("package", PACKAGES)
def test_api_doc_lists_exactly_the_exported_names(package):
    doc = _documented()
    assert package in doc, f"docs/api.md has no section ## `{package}`"
    names = set(importlib.import_module(package).__all__)
    assert doc[package] == names, {"undocumented": sorted(names - doc[package]), "stale": sorted(doc[package] - names)}


def test_import_brickwork_loads_no_layer_and_subpackages_load_on_access():
    code = (
        "import sys, brickwork\n"
        "before = sorted(m for m in sys.modules if m.startswith('brickwork'))\n"
        "brickwork.nn.MoE\n"
        "print(before, 'brickwork.experiment' in sys.modules, brickwork.__version__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == f"['brickwork', 'brickwork._version'] False {version('brickwork')}"


def test_the_version_has_one_home():
    # pyproject.toml reads it from brickwork/_version.py (checkpoints record the same string).
    from brickwork._version import __version__

    assert version("brickwork") == __version__


def test_unknown_attribute_of_brickwork_is_an_attribute_error():
    import brickwork

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = brickwork.nope
