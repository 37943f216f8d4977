"""Reading a user's YAML: safe, strict about duplicate keys, bounded in alias expansion.

``yaml.safe_load`` never constructs objects from tags, but it keeps the last of two equal keys
(``lr: 0.1`` then ``lr: 1`` silently trains at 1) and it expands aliases without bound: a
524-byte document of nested aliases ("billion laughs") stands for ~10^9 nodes, which costs
nothing to parse (aliases share nodes) but gigabytes and minutes to validate or print. The
loader here refuses both with one :class:`~brickwork.errors.ConfigError` naming the line.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from yaml import MappingNode, Node, SequenceNode

from brickwork.errors import ConfigError

#: Nodes a document may stand for once its aliases are expanded. Real configs have hundreds;
#: the bound only stops documents built to explode.
MAX_NODES = 100_000


def _where(node: Node) -> str:
    mark = node.start_mark
    return f"line {mark.line + 1}, column {mark.column + 1}"


class StrictLoader(yaml.SafeLoader):
    """``SafeLoader`` that refuses duplicate mapping keys and documents that expand beyond :data:`MAX_NODES`."""

    def compose_document(self) -> Node | None:
        node: Node | None = super().compose_document()
        if node is not None:
            _expanded_size(node, {}, set())
        return node

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` merges are allowed; their keys may be overridden
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                continue  # an unhashable key: SafeLoader reports it itself
            if duplicate:
                raise ConfigError(
                    "", f"duplicate key {key!r} at {_where(key_node)} (each key may appear once)", show_value=False
                )
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 (PyYAML) reads `1e-3` and `1e6` as strings: its float pattern needs a dot. Configs
# are validated strictly (a string is not a number), so such values would be refused although
# every user means a float; resolve them as YAML 1.2 does. Plain integers stay integers (their
# resolver comes first), and `.inf` / `.nan` stay floats that validation refuses.
StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _expanded_size(node: Node, sizes: dict[int, int], open_: set[int]) -> int:
    """Nodes ``node`` stands for with aliases expanded (memoised per shared node: linear time)."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_:
        raise ConfigError(
            "", f"recursive YAML alias at {_where(node)} (a value cannot contain itself)", show_value=False
        )
    open_.add(key)
    total = 1
    if isinstance(node, SequenceNode):
        children: list[Node] = list(node.value)
    elif isinstance(node, MappingNode):
        children = [n for pair in node.value for n in pair]
    else:
        children = []
    for child in children:
        total += _expanded_size(child, sizes, open_)
        if total > MAX_NODES:
            raise ConfigError(
                "",
                f"YAML aliases at {_where(node)} expand to more than {MAX_NODES:,} values (an alias bomb?)",
                show_value=False,
            )
    open_.discard(key)
    sizes[key] = total
    return total


def safe_load(text: str) -> Any:
    """Parse one YAML document with :class:`StrictLoader`.

    Raises:
        ConfigError: a duplicate key, a recursive alias, or aliases expanding past :data:`MAX_NODES`.
        yaml.YAMLError: malformed YAML.
    """
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 -- StrictLoader is a SafeLoader
