"""One generic registry: every named thing a config or the CLI can refer to.

Kinds in use: ``brick``, ``model``, ``dataset``, ``router``, ``loss``, ``distill_loss``, ``optimizer``,
``op`` and ``stage``. An entry is a callable with a typed signature; its arguments are
what a config may set. Registering never executes user code: a config only names entries.

The registry sits below every layer and imports nothing of brickwork but ``errors``. An entry
exists once the module defining it is imported: the layer that resolves names from configs
loads them all (``brickwork.experiment.builtins.load_builtins``, called when
``brickwork.experiment`` is imported and by the CLI); a lookup below it finds what its own
imports registered.

Example:
    >>> from brickwork.registry import register, REGISTRY
    >>> @register("loss", "my_loss")
    ... def my_loss(logits, target): ...
    >>> [e.name for e in REGISTRY.list("loss", "my_*")]
    ['my_loss']
"""

from __future__ import annotations

import dataclasses
import fnmatch
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar, get_type_hints

from brickwork.errors import ConfigError

KINDS = ("brick", "model", "dataset", "router", "loss", "distill_loss", "optimizer", "op", "stage")

F = TypeVar("F", bound=Callable[..., Any])


class Flatten:
    """Marks an argument whose type is a settings dataclass: a config sets its fields, flat.

    Use as ``settings: Annotated[TrainSettings, Flatten] = TrainSettings()``: the config keys
    are the dataclass's fields at the level of the other arguments (``{stage: train, lr: 3e-3}``),
    :meth:`Entry.params` lists them with their types and defaults, and config validation builds
    the settings object from them. The callable itself receives the object.
    """


@dataclass(frozen=True)
class Param:
    """One argument of a registered callable, as a config sees it.

    ``group`` names the settings argument (marked :class:`Flatten`) the key belongs to, or is
    None for an argument of the callable itself.
    """

    name: str
    annotation: Any
    default: Any = inspect.Parameter.empty
    group: str | None = None

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty

    def describe(self) -> str:
        ann = _type_name(self.annotation)
        return f"{self.name}: {ann}" if self.required else f"{self.name}: {ann} = {self.default!r}"


@dataclass(frozen=True)
class Entry:
    """A registered callable with its kind, name and one-line description."""

    kind: str
    name: str
    obj: Callable[..., Any]
    description: str
    # Arguments filled in by brickwork itself (e.g. a model's ``in_shape`` from the data),
    # so they are not the config's to set.
    injected: tuple[str, ...] = field(default=())

    def params(self, *, include_injected: bool = False) -> list[Param]:
        """The keyword arguments a config may pass, with types and defaults.

        A settings argument (``Annotated[T, Flatten]``) is listed as the fields of ``T``, with
        the argument's default object (or the field's own default) as their defaults.
        """
        target = self.obj.__init__ if inspect.isclass(self.obj) else self.obj
        sig = inspect.signature(target)
        hints = _hints(target)
        out: list[Param] = []
        for p in sig.parameters.values():
            if p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            if p.name in self.injected and not include_injected:
                continue
            if p.kind is p.POSITIONAL_ONLY:  # runtime inputs (a model, a context), not config
                continue
            ann = hints.get(p.name, p.annotation)
            settings = settings_type(ann)
            out += _fields(settings, p.name, p.default) if settings else [Param(p.name, ann, p.default)]
        seen: set[str] = set()
        for q in out:
            if q.name in seen:
                raise TypeError(
                    f"{self.kind} {self.name!r}: config key {q.name!r} is defined twice "
                    "(a settings field shadows another argument)"
                )
            seen.add(q.name)
        return out

    def call_args(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """``args`` with the flat keys of each settings argument gathered into its object.

        Keys that are not settings fields pass through; a settings object already present
        (``args[group]``) is completed by its given fields. Raises ``TypeError`` or pydantic's
        ``ValidationError`` from the settings type for bad values (config validation checks
        each field before, with the key path).
        """
        params = self.params(include_injected=True)
        out = {k: v for k, v in args.items() if k not in {p.name for p in params if p.group}}
        for group, fields in _by_group(params).items():
            given = {p.name: args[p.name] for p in fields if p.name in args}
            base = out.pop(group, None)
            if base is None and not given:
                continue  # the callable's own default object applies
            if base is None:
                base = fields[0].default_object
            out[group] = dataclasses.replace(base, **given) if base is not None else fields[0].settings(**given)
        return out

    def flat_args(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """The inverse of :meth:`call_args`: settings objects spread into their fields (the config's view)."""
        groups = _by_group(self.params(include_injected=True))
        out: dict[str, Any] = {}
        for k, v in args.items():
            if k in groups and dataclasses.is_dataclass(v) and not isinstance(v, type):
                out.update({f.name: getattr(v, f.name) for f in dataclasses.fields(v)})
            else:
                out[k] = v
        return out


def settings_type(annotation: Any) -> type | None:
    """The dataclass ``T`` of an ``Annotated[T, Flatten]`` annotation, else None."""
    if typing.get_origin(annotation) is not typing.Annotated:
        return None
    base = typing.get_args(annotation)[0]
    marked = any(m is Flatten or isinstance(m, Flatten) for m in annotation.__metadata__)
    if not marked:
        return None
    if not (isinstance(base, type) and dataclasses.is_dataclass(base)):
        raise TypeError(f"Flatten marks a dataclass type, not {base!r}")
    return base


@dataclass(frozen=True)
class _Field(Param):
    """A :class:`Param` that is a field of a settings argument (knows its type and default object)."""

    settings: Any = None
    default_object: Any = None


def _hints(target: Any) -> dict[str, Any]:
    try:
        return get_type_hints(target, include_extras=True)
    except Exception:  # an unresolvable forward reference: fall back to raw annotations
        return {}


def _fields(settings: type, group: str, default: Any) -> list[Param]:
    obj = None if default is inspect.Parameter.empty else default
    hints = _hints(settings)
    out: list[Param] = []
    for f in dataclasses.fields(settings):
        if obj is not None:
            value = getattr(obj, f.name)
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            value = inspect.Parameter.empty
        out.append(_Field(f.name, hints.get(f.name, f.type), value, group, settings, obj))
    return out


def _by_group(params: list[Param]) -> dict[str, list[_Field]]:
    groups: dict[str, list[_Field]] = {}
    for p in params:
        if isinstance(p, _Field) and p.group:
            groups.setdefault(p.group, []).append(p)
    return groups


class Registry:
    """Names to callables, grouped by kind."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Entry]] = {k: {} for k in KINDS}

    def add(self, entry: Entry) -> None:
        table = self._entries.setdefault(entry.kind, {})
        old = table.get(entry.name)
        if old is not None and old.obj is not entry.obj:
            raise ValueError(f"{entry.kind} {entry.name!r} is registered twice")
        table[entry.name] = entry

    def get(self, kind: str, name: str, *, path: str = "") -> Entry:
        """The entry ``name`` of ``kind``; a :class:`ConfigError` with close matches if unknown."""
        if kind not in self._entries:
            raise ConfigError(path, f"unknown registry kind; expected one of {list(KINDS)}", kind)
        table = self._entries[kind]
        if name not in table:
            raise ConfigError(path, f"unknown {kind} name; `brickwork ls {kind}` lists them", name, choices=table)
        return table[name]

    def names(self, kind: str) -> list[str]:
        """The registered names of ``kind``, sorted."""
        return sorted(self._entries.get(kind, {}))

    def list(self, kind: str | None = None, pattern: str = "*") -> list[Entry]:
        """Entries of ``kind`` (all kinds if None) whose name matches the glob ``pattern``."""
        kinds = [kind] if kind else list(self._entries)
        return [
            e
            for k in kinds
            for name, e in sorted(self._entries.get(k, {}).items())
            if fnmatch.fnmatchcase(name, pattern)
        ]


REGISTRY = Registry()


def register(
    kind: str, name: str, description: str | None = None, *, injected: tuple[str, ...] = ()
) -> Callable[[F], F]:
    """Decorator that adds a function or class to the registry under ``kind``/``name``.

    Args:
        kind: one of :data:`KINDS`.
        name: the name configs use; lowercase, words joined by ``-`` or ``_``.
        description: one line for ``brickwork ls``; defaults to the docstring's first line.
        injected: argument names brickwork fills in itself (hidden from configs).
    """

    def wrap(obj: F) -> F:
        doc = description or (inspect.getdoc(obj) or "").split("\n")[0]
        REGISTRY.add(Entry(kind, name, obj, doc, injected))
        return obj

    return wrap


def _type_name(ann: Any) -> str:
    """A short, readable type for ``brickwork ls``: ``int (>= 1) | None``, ``list[float (>= 0)]``."""
    if ann is inspect.Parameter.empty:
        return "any"
    if ann is type(None):
        return "None"
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Annotated:
        bits = [_constraint_text(m) for m in ann.__metadata__]
        return _type_name(args[0]) + "".join(f" ({b})" for b in bits if b)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is typing.Literal:
        return "Literal[" + ", ".join(repr(a) for a in args) + "]"
    if origin is not None and args:
        name = getattr(origin, "__name__", repr(origin).replace("typing.", ""))
        return f"{name}[{', '.join('...' if a is Ellipsis else _type_name(a) for a in args)}]"
    if isinstance(ann, type):
        return ann.__name__
    return repr(ann).replace("typing.", "")


def _constraint_text(meta: Any) -> str:
    names = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    parts = []
    for m in getattr(meta, "metadata", [meta]):
        for attr, sym in names.items():
            v = getattr(m, attr, None)
            if v is not None:
                parts.append(f"{sym} {v}")
    kind = getattr(meta, "kind", None)
    if kind:
        parts.append(f"a {kind} name")
    return ", ".join(parts)


@dataclass(frozen=True)
class RegistryName:
    """Marks a ``str`` argument as a name of ``kind`` in the registry.

    Use as ``Annotated[str, RegistryName("optimizer")]``: config validation then checks that
    the name exists and suggests the closest ones when it does not.
    """

    kind: str
