"""The layer rules of the design, checked on the import graph of every module of brickwork.

Imports are read with :mod:`ast`, not by importing: absolute and relative imports, imports
inside functions and under ``TYPE_CHECKING``, and ``importlib.import_module("brickwork...")``
with a literal name all count, because a lazy import is still a dependency.

Layers, bottom to top (a module may import its own layer's package and anything lower):

    errors, persist, registry, _version     bottom (registry and persist import only errors)
    kernels
    nn
    ops, train, analysis, data, models,     siblings, minus the extra forbidden edges below
    distributed                             (train may import distributed, not the reverse)
    experiment, verbs    |  bench           bench beside experiment: neither imports the other
    cli, __main__, brickwork (the package)  top
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "brickwork"

# Rank of each top-level part of brickwork; an import must go to a strictly lower rank or stay
# inside its own part. Parts of equal rank are siblings (allowed unless listed in FORBIDDEN).
RANK = {
    "errors": 0,
    "persist": 0,
    "registry": 0,
    "_version": 0,
    "textio": 0,
    "kernels": 1,
    "nn": 2,
    "ops": 3,
    "train": 3,
    "analysis": 3,
    "data": 3,
    "models": 3,
    "distributed": 3,  # process groups, DDP/FSDP2 wrapping, rank-0 guards (train imports it)
    "experiment": 4,
    "verbs": 4,
    "bench": 4,
    "cli": 5,
    "__main__": 5,
    "": 5,  # the package itself (brickwork/__init__.py): nothing below the top may import it
}

# Bottom modules that may import only the modules listed.
ONLY = {
    "errors": set(),
    "_version": set(),
    "textio": {"errors"},
    "persist": {"errors", "textio"},
    "registry": {"errors"},
}

# Edges forbidden although the ranks alone would allow them (siblings).
FORBIDDEN = {
    ("analysis", "ops"),  # analysis measures; it never runs a model-to-model operation
    ("ops", "experiment"),
    ("train", "experiment"),
    ("data", "models"),  # data is below the reference architectures that consume it
    ("distributed", "train"),  # train takes a DistContext; distributed knows no training loop
    ("experiment", "bench"),  # bench sits beside experiment: timing lives in analysis/
    ("verbs", "bench"),
    ("bench", "experiment"),
    ("bench", "verbs"),
}


@dataclass(frozen=True)
class Edge:
    """One import of a brickwork module by another, with where it is written."""

    src: str
    dst: str
    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.src} -> {self.dst}  ({self.file}:{self.line})"


def _module_name(path: Path) -> str:
    parts = ("brickwork", *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The module an imported dotted name executes: itself, or the closest enclosing module."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _targets(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The brickwork modules one AST node imports (empty for anything else)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "brickwork"]
    if isinstance(node, ast.ImportFrom):
        if node.level:  # relative: the package of this module, then one up per extra dot
            base = module.split(".")
            base = base if is_package else base[:-1]
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        if prefix.split(".")[0] != "brickwork":
            return []
        # `from pkg import sub` imports the submodule when there is one; otherwise a name of pkg.
        return [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in MODULES else prefix for a in node.names]
    if isinstance(node, ast.Call) and _is_import_call(node.func) and node.args:
        arg = node.args[0]
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            return [arg.value] if arg.value.startswith("brickwork") else []
        if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
            head = str(arg.values[0].value)  # f"brickwork.bench.{name}": depends on that package
            return [head.rstrip(".")] if head.startswith("brickwork") else []
    return []


def _is_import_call(func: ast.expr) -> bool:
    if isinstance(func, ast.Attribute):
        return func.attr == "import_module"
    return isinstance(func, ast.Name) and func.id in {"import_module", "__import__"}


def _edges() -> list[Edge]:
    edges: list[Edge] = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        rel = str(path.relative_to(ROOT.parent))
        for node in ast.walk(tree):
            for target in _targets(node, module, path.name == "__init__.py"):
                dst = _resolve(target)
                if dst is not None and dst != module:
                    edges.append(Edge(module, dst, rel, node.lineno))
    # `from x import a, b` of one module is one edge
    return sorted(set(edges), key=lambda e: (e.file, e.line, e.dst))


EDGES = _edges()


def _part(module: str) -> str:
    """The top-level part of brickwork a module belongs to (``""`` for the package itself)."""
    return module.split(".")[1] if "." in module else ""


def violation(edge: Edge) -> str | None:
    """Why ``edge`` breaks a layer rule, or None if it is allowed."""
    src, dst = _part(edge.src), _part(edge.dst)
    if src not in RANK:
        return f"{edge.src} is in no layer: add it to RANK in tests/test_layers.py"
    if dst not in RANK:
        return f"{edge.dst} is in no layer: add it to RANK in tests/test_layers.py"
    if src in ONLY:
        return None if dst in ONLY[src] else f"{src} may import only {sorted(ONLY[src]) or 'nothing'}"
    if src == dst:
        return None
    if (src, dst) in FORBIDDEN:
        return f"{src} must not import {dst}"
    if RANK[dst] > RANK[src]:
        return f"{src} (layer {RANK[src]}) imports {dst} (layer {RANK[dst]}), which is above it"
    if RANK[dst] == RANK[src] == 0:
        return f"{src} must not import {dst}"
    return None


def test_the_graph_sees_every_kind_of_import():
    # Guards the parser itself: a rule checked on a graph that misses imports proves nothing.
    src = (
        "from typing import TYPE_CHECKING\n"
        "import brickwork.nn.stack\n"
        "from brickwork.nn import moe\n"
        "from . import batching\n"
        "from ..errors import ConfigError\n"
        "if TYPE_CHECKING:\n"
        "    from brickwork.models.mlp import mlp\n"
        "def f():\n"
        "    import importlib\n"
        "    importlib.import_module('brickwork.ops.slice')\n"
        "    from brickwork.train import loop\n"
    )
    found = {
        _resolve(t)
        for node in ast.walk(ast.parse(src))
        for t in _targets(node, "brickwork.data.sentences", is_package=False)
    }
    assert found == {
        "brickwork.nn.stack",
        "brickwork.nn.moe",
        "brickwork.data.batching",
        "brickwork.errors",
        "brickwork.models.mlp",
        "brickwork.ops.slice",
        "brickwork.train.loop",
    }


def test_a_planted_forbidden_import_is_reported():
    planted = [
        Edge("brickwork.nn.moe", "brickwork.experiment.config", "brickwork/nn/moe.py", 1),
        Edge("brickwork.registry", "brickwork.data", "brickwork/registry.py", 1),
        Edge("brickwork.analysis.compute", "brickwork.ops.slice", "brickwork/analysis/compute.py", 1),
        Edge("brickwork.train.checkpoint", "brickwork", "brickwork/train/checkpoint.py", 1),
        Edge("brickwork.experiment.stages.depth", "brickwork.bench.timing", "x.py", 1),
        Edge("brickwork.data.sentences", "brickwork.models.minilm", "x.py", 1),
    ]
    assert all(violation(e) for e in planted), [str(e) for e in planted if not violation(e)]
    allowed = [
        Edge("brickwork.ops.slice", "brickwork.nn.stack", "x.py", 1),
        Edge("brickwork.models.minilm", "brickwork.data.tokenizer", "x.py", 1),
        Edge("brickwork.registry", "brickwork.errors", "x.py", 1),
        Edge("brickwork.cli", "brickwork.bench", "x.py", 1),
        Edge("brickwork.bench.moe", "brickwork.analysis.timing", "x.py", 1),
    ]
    assert not [str(e) for e in allowed if violation(e)]


def test_no_forbidden_import():
    bad = [f"{e}: {violation(e)}" for e in EDGES if violation(e)]
    assert not bad, "forbidden imports:\n" + "\n".join(bad)


def _package_edge(edge: Edge) -> bool:
    """An edge from a package ``__init__`` into its own subpackage: a re-export, not a cycle."""
    return MODULES[edge.src].name == "__init__.py" and edge.dst.startswith(edge.src + ".")


def strongly_connected(edges: list[Edge]) -> list[list[str]]:
    """Components of more than one module of the graph ``edges`` (Tarjan, iterative)."""
    graph: dict[str, list[str]] = defaultdict(list)
    for e in edges:
        graph[e.src].append(e.dst)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        comp.append(top)
                        if top == node:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(graph[child])))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return sorted(found)


def test_cycle_finder_finds_a_cycle_and_ignores_reexports():
    e = [Edge("a", "b", "", 1), Edge("b", "c", "", 1), Edge("c", "a", "", 1), Edge("c", "d", "", 1)]
    assert strongly_connected(e) == [["a", "b", "c"]]
    assert strongly_connected(e[1:]) == []


def test_no_import_cycle():
    edges = [e for e in EDGES if not _package_edge(e)]
    cycles = strongly_connected(edges)
    lines = []
    for comp in cycles:
        members = set(comp)
        lines.append(f"cycle of {len(comp)} modules: {', '.join(comp)}")
        lines += [f"    {e}" for e in edges if e.src in members and e.dst in members]
    assert not cycles, "\n".join(lines)


@pytest.mark.parametrize("module", ["brickwork.nn", "brickwork.kernels", "brickwork.registry"])
def test_low_layers_import_nothing_above_them_at_runtime(module):
    # The import graph above is static; this checks the same rule by really importing, in a
    # fresh interpreter so modules other tests loaded do not hide an upward import.
    import subprocess
    import sys

    code = (
        f"import sys, {module}\n"
        "above = ('experiment', 'ops', 'train', 'analysis', 'data', 'models', 'bench', 'verbs', 'cli')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[:2][-1] in above and m.startswith('brickwork.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"importing {module} loads {out.strip()}"


def _child(module: str, package: str) -> str:
    """The direct child of ``package`` (a module or a subpackage) that contains ``module``."""
    return f"{package}.{module[len(package) + 1 :].split('.')[0]}"


def package_cycles(edges: list[Edge], packages: list[str]) -> list[str]:
    """Cycles among the children of each package (each subpackage collapsed to one node)."""
    lines = []
    for pkg in packages:
        inside = [
            Edge(_child(e.src, pkg), _child(e.dst, pkg), e.file, e.line)
            for e in edges
            if e.src.startswith(pkg + ".") and e.dst.startswith(pkg + ".")
        ]
        inside = [e for e in inside if e.src != e.dst]
        for comp in strongly_connected(inside):
            lines.append(f"in {pkg}: cycle between {', '.join(comp)}")
            lines += [f"    {e}" for e in inside if e.src in comp and e.dst in comp]
    return lines


def test_package_cycles_collapse_subpackages():
    # nn.moe -> nn.routing.settings -> nn.moe is a cycle between nn.moe and the nn.routing
    # package even though no single module imports another one back.
    e = [Edge("b.nn.moe", "b.nn.routing.settings", "", 1), Edge("b.nn.routing.topk", "b.nn.moe", "", 1)]
    assert package_cycles(e, ["b", "b.nn", "b.nn.routing"]) == [
        "in b.nn: cycle between b.nn.moe, b.nn.routing",
        "    b.nn.moe -> b.nn.routing  (:1)",
        "    b.nn.routing -> b.nn.moe  (:1)",
    ]
    assert strongly_connected(e) == []


def test_no_cycle_between_the_children_of_any_package():
    # Packages re-export their children eagerly (`nn/__init__` imports `nn.moe`, ...). That is
    # safe only if, collapsing each subpackage to one node, the children of every package form
    # no cycle: otherwise importing one child first can enter a sibling's half-run __init__.
    packages = sorted(m for m, p in MODULES.items() if p.name == "__init__.py")
    lines = package_cycles(EDGES, packages)
    assert not lines, "\n".join(lines)
