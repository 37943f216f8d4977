"""YAML configs validated into typed specs; the only place configuration becomes objects.

A config is data, model variants and an ordered list of stages::

    name: digits-mlp
    seed: 0
    data: {name: digits}
    seeds: [0, 1, 2]             # optional: repeat every variant per seed, report mean and std
    models:                      # named variants; ``model: {...}`` is shorthand for one
      small: {name: mlp-tiny}
      wide:  {name: mlp, width: 256}
    stages:
      - {stage: train, epochs: 5}
      - {stage: evaluate}

Every ``name`` resolves through the registry, and every other key is checked against the
typed signature of what it names. Validation fails before any work starts, with one
:class:`~brickwork.errors.ConfigError` naming the key path, the bad value, what was
expected and the closest valid names. Nothing in a config is ever executed.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from brickwork.errors import ConfigError
from brickwork.experiment.yaml_io import safe_load
from brickwork.registry import REGISTRY, Entry, RegistryName
from brickwork.textio import read_utf8

#: Names that become file or folder names (the run's ``name``, model labels): one path segment of
#: safe characters, bounded length, never ``.``/``..`` (a label like ``../x`` or ``/etc`` would write
#: outside the run folder; an empty one into its root).
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SAFE_NAME_HELP = "1-64 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit, without '..'"


def check_name(path: str, value: object, what: str) -> str:
    """``value`` if it is a safe single path segment; else a :class:`ConfigError` at ``path``."""
    if not isinstance(value, str) or not SAFE_NAME.fullmatch(value) or ".." in value:
        raise ConfigError(path, f"{what} becomes a folder name: expected {_SAFE_NAME_HELP}", value)
    return value


class LogSettings(BaseModel):
    """What a run logs while it trains (``log:`` in a config).

    Attributes:
        tensorboard: write TensorBoard event files (``<run>/tb/<variant>/seed<k>``); default
            (null): when the ``tensorboard`` extra is installed.
    """

    model_config = ConfigDict(extra="forbid")

    tensorboard: bool | None = None


class _Top(BaseModel):
    """The top level of a config; registry-backed sections are checked by :func:`_resolve_spec`."""

    model_config = ConfigDict(extra="forbid")

    name: str = "run"  # checked by check_name: it becomes part of paths
    seed: Annotated[int, Field(ge=0)] = 0
    seeds: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)] | None = None
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    threads: Annotated[int, Field(ge=1)] | None = None
    data: dict[str, Any]
    model: dict[str, Any] | None = None
    models: dict[str, dict[str, Any]] | None = None
    stages: Annotated[list[dict[str, Any]], Field(min_length=1)]
    aux_weights: dict[str, Annotated[float, Field(ge=0)]] = Field(default_factory=dict)
    log: LogSettings = Field(default_factory=LogSettings)


@dataclass(frozen=True)
class Spec:
    """A registry name with its validated arguments (defaults filled in)."""

    kind: str
    name: str
    args: dict[str, Any]

    @property
    def entry(self) -> Entry:
        return REGISTRY.get(self.kind, self.name)

    def to_dict(self, key: str = "name") -> dict[str, Any]:
        """The spec as a config writes it: settings objects spread back into flat keys."""
        return {key: self.name, **_plain(self.entry.flat_args(self.args))}


@dataclass(frozen=True)
class RunConfig:
    """A validated config: everything the runner needs, with defaults made explicit."""

    name: str
    seed: int
    seeds: list[int] | None
    device: str
    threads: int | None
    data: Spec
    models: dict[str, Spec]
    stages: list[Spec]
    aux_weights: dict[str, float] = field(default_factory=dict)
    log: LogSettings = field(default_factory=LogSettings)

    @property
    def run_seeds(self) -> list[int]:
        """Seeds of model initialisation and training; the data split always uses ``seed``."""
        return list(self.seeds) if self.seeds else [self.seed]

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data; loading it again gives an equal config."""
        return {
            "name": self.name,
            "seed": self.seed,
            "seeds": self.seeds,
            "device": self.device,
            "threads": self.threads,
            "data": self.data.to_dict(),
            "models": {k: v.to_dict() for k, v in self.models.items()},
            "stages": [s.to_dict("stage") for s in self.stages],
            "aux_weights": dict(self.aux_weights),
            "log": self.log.model_dump(),
        }


def load_config(source: str | Path | dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read (YAML path or dict), apply ``key.path=value`` overrides, validate.

    Raises:
        ConfigError: with the key path, the bad value and what was expected.
    """
    raw = read_yaml(source) if isinstance(source, (str, Path)) else copy.deepcopy(source)
    for item in overrides:
        apply_override(raw, item)
    return validate(raw)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            "", f"config file {str(path)!r} not found (paths are relative to {os.getcwd()})", show_value=False
        )
    try:
        raw = safe_load(read_utf8(path))  # safe: YAML tags cannot construct objects; duplicates refused
    except ConfigError as e:
        raise ConfigError("", f"{path}: {e}", show_value=False) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError("", f"{path}: malformed YAML{where}: {problem}", show_value=False) from None
    if not isinstance(raw, dict):
        raise ConfigError("", f"{path}: expected a mapping of keys (name, data, models, stages) at the top", raw)
    return raw


_KEY = re.compile(r"[^.\[\]]+|\[\d+\]")


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set ``a.b[0].c=value`` (or ``a.b.0.c=value``) in ``raw``; the value is parsed as YAML."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError("", f"override {item!r} is not of the form key.path=value", show_value=False)
    parts = [p.strip("[]") for p in _KEY.findall(key)]
    try:
        value = safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text  # not YAML: the plain string (a name, a path)
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        here = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(here, f"override index out of range: the list has {len(node)} items", part)
            part_key: Any = int(part)
        elif isinstance(node, dict):
            part_key = part
            if not last and part_key not in node:
                node[part_key] = {}
        else:
            raise ConfigError(here, "override goes into a value that is not a mapping or list", node)
        if last:
            node[part_key] = value
        else:
            node = node[part_key]


def validate(raw: dict[str, Any]) -> RunConfig:
    """Validate a config mapping into a :class:`RunConfig`."""
    if not isinstance(raw, dict):
        raise ConfigError("", "expected a mapping of keys (name, data, models, stages) at the top", raw)
    check_finite(raw, "")
    try:
        # strict: `seed: true` or `seed: "3"` is refused rather than read as 1 or 3.
        top = _Top.model_validate(raw, strict=True)
    except ValidationError as e:
        raise _from_pydantic(e, "") from None
    check_name("name", top.name, "the run name")
    if (top.model is None) == (top.models is None):
        raise ConfigError(
            "models", "give exactly one of `model:` (one model) or `models:` (named variants)", show_value=False
        )
    if top.models is not None:
        if not top.models:
            raise ConfigError("models", "expected at least one model variant", top.models)
        models = {label: _resolve_spec("model", spec, f"models.{label}") for label, spec in top.models.items()}
        for label in models:  # after resolving every variant: an unknown model name is the first error
            check_name(f"models.{label}", label, "a model label")
    else:
        assert top.model is not None  # exactly one of the two, checked above
        spec = _resolve_spec("model", top.model, "model")
        models = {check_name("model.name", spec.name, "a model label"): spec}  # labelled by its registered name
    stages = [_resolve_spec("stage", s, f"stages[{i}]", key="stage") for i, s in enumerate(top.stages)]
    return RunConfig(
        name=top.name,
        seed=top.seed,
        seeds=top.seeds,
        device=top.device,
        threads=top.threads,
        data=_resolve_spec("dataset", top.data, "data"),
        models=models,
        stages=stages,
        aux_weights=top.aux_weights,
        log=top.log,
    )


def check_finite(value: Any, path: str) -> None:
    """Refuse ``.inf`` / ``.nan`` anywhere in a config: no setting means anything with them."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(path, "expected a finite number", value)
    if isinstance(value, dict):
        for k, v in value.items():
            check_finite(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_finite(v, f"{path}[{i}]")


def _resolve_spec(kind: str, raw: dict[str, Any], path: str, key: str = "name") -> Spec:
    # raw is a mapping: _Top's types checked that (data: digits is refused there, with its path)
    if key not in raw:
        raise ConfigError(f"{path}.{key}", f"missing; `brickwork ls {kind}` lists the names", show_value=False)
    name = raw[key]
    if not isinstance(name, str):
        raise ConfigError(f"{path}.{key}", f"expected a {kind} name (a string)", name)
    entry = REGISTRY.get(kind, name, path=f"{path}.{key}")
    args = {k: v for k, v in raw.items() if k != key}
    return Spec(kind, name, validate_args(entry, args, path))


def validate_args(entry: Entry, args: dict[str, Any], path: str) -> dict[str, Any]:
    """Check ``args`` against ``entry``'s typed signature; return them with defaults filled in.

    ``args`` are the config's flat keys; the fields of a settings argument (``Annotated[T,
    Flatten]``) are among them. The result is what the callable takes: each settings object
    built from its fields and checked (its ``check(path)`` method, where it has one, rejects
    combinations no single field shows, such as a setting the chosen router does not use).
    A settings object already built (re-validating a :class:`Spec`'s ``args``) is taken apart.
    """
    args = entry.flat_args(args)
    params = {p.name: p for p in entry.params()}
    for k in args:
        if k not in params:
            expected = ", ".join(params) or "no arguments"
            raise ConfigError(
                f"{path}.{k}",
                f"unknown argument for {entry.kind} {entry.name!r}; expected {expected}",
                k,
                choices=params,
            )
    out: dict[str, Any] = {}
    for name, p in params.items():
        where = f"{path}.{name}"
        if name not in args:
            if p.required:
                raise ConfigError(
                    where, f"required argument of {entry.kind} {entry.name!r} is missing", show_value=False
                )
            out[name] = p.default
            continue
        out[name] = _check_value(p.annotation, args[name], where)
        if name == "path" and isinstance(out[name], str) and not Path(out[name]).exists():  # a file or a folder (txt)
            raise ConfigError(where, f"file not found (relative paths start at {os.getcwd()})", out[name])
    grouped = entry.call_args(out)
    for group in {p.group for p in params.values() if p.group}:
        check = getattr(grouped.get(group), "check", None)
        if callable(check):
            check(path)
    return grouped


def _check_value(annotation: Any, value: Any, where: str) -> Any:
    if annotation is inspect.Parameter.empty:
        return value
    try:
        checked = _strict_validate(_adapter(annotation), value)
    except ValidationError as e:
        raise _from_pydantic(e, where, choices=_literals(annotation)) from None
    for meta in _metadata(annotation):
        if isinstance(meta, RegistryName) and checked is not None:  # None: an optional name not given
            REGISTRY.get(meta.kind, checked, path=where)
    return checked


def _literals(annotation: Any) -> list[str] | None:
    """The string values of the ``Literal`` in ``annotation`` (inside Annotated / unions), for close matches."""
    if get_origin(annotation) is Literal:
        return [str(a) for a in get_args(annotation)]
    found = [v for a in get_args(annotation) for v in (_literals(a) or [])]
    return found or None


def _strict_validate(adapter: TypeAdapter[Any], value: Any) -> Any:
    """Validate strictly, as JSON: no bool or string as a number, no float with a fraction as an int.

    Strict JSON mode is strict about scalars yet takes a list where the signature says tuple (a
    YAML config has no tuples), and an int where it says float. A value JSON cannot hold (only
    reachable from Python callers) is validated in Python's lax mode.
    """
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return adapter.validate_python(value)
    return adapter.validate_json(text, strict=True)


_ADAPTERS: dict[Any, TypeAdapter[Any]] = {}


def _adapter(annotation: Any) -> TypeAdapter[Any]:
    key = repr(annotation)
    if key not in _ADAPTERS:
        _ADAPTERS[key] = TypeAdapter(annotation)
    return _ADAPTERS[key]


def _metadata(annotation: Any) -> list[Any]:
    if get_origin(annotation) is Annotated:
        return list(getattr(annotation, "__metadata__", ()))
    return [m for a in get_args(annotation) for m in _metadata(a)]


def _from_pydantic(e: ValidationError, base: str, choices: list[str] | None = None) -> ConfigError:
    """The first pydantic error as one ConfigError with a dotted key path."""
    err = e.errors()[0]
    loc = base
    for part in err["loc"]:
        if isinstance(part, int):
            loc += f"[{part}]"
        elif str(part).startswith("constrained-") or "[" in str(part):
            # pydantic's names for union members: constrained-int, list[int], function-after[f(), int]
            continue
        else:
            loc += f".{part}" if loc else str(part)
    kind = err["type"]
    if kind == "extra_forbidden":  # only the top level and `log:` are models that forbid extra keys
        keys = list((LogSettings if err["loc"][:-1] == ("log",) else _Top).model_fields)
        return ConfigError(loc, f"unknown key; expected one of {', '.join(keys)}", str(err["loc"][-1]), choices=keys)
    if kind == "missing":
        return ConfigError(loc, "required key is missing", show_value=False)
    got = err["input"]  # the bad value itself, inside a list or mapping
    close = choices if isinstance(got, str) else None  # also `interval: epochs` (int | "epoch"): 'epoch'?
    return ConfigError(loc, f"{err['msg'][0].lower()}{err['msg'][1:]}", got, choices=close)


def _plain(obj: Any) -> Any:
    """Tuples to lists and other non-YAML values to plain ones, for writing resolved configs."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):  # a typed argument (a distill term)
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    return obj
