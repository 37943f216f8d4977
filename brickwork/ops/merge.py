"""Merging same-architecture models, the model-level front end: modules, state dicts, options, overrides.

:func:`merge` (a new module) and :func:`merge_state_dicts` (a state dict) take models as modules or
state dicts, parse the options (:func:`make_options`) and the module-path ``overrides``
(:func:`options_for`: glob -> options, applied in order, later patterns winning, the method
included), check every input before any tensor is computed (:func:`check_merge`: the same tensors,
shapes and dtypes in every model, statistics that fit) and run the per-tensor engine of
:mod:`brickwork.ops.merge_engine` (the methods and their semantics are described there) on each
tensor. :mod:`brickwork.ops.merge_files` runs the same engine streaming over safetensors files.

The ops **copy**: inputs are never modified.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from brickwork.errors import BrickworkError
from brickwork.ops.merge_engine import (
    CHUNK,
    METHODS,
    NEEDS_BASE,
    NEEDS_STATS,
    MergeMethod,
    MergeOptions,
    Source,
    TensorSource,
    TiesSemantics,
    check_stats,
    merge_pieces,
    merge_tensor,
)
from brickwork.ops.merge_statistics import fisher_diagonal, gram_matrices
from brickwork.registry import register

__all__ = [  # the front end, and the engine's names its callers have always imported from here
    "CHUNK",
    "METHODS",
    "NEEDS_BASE",
    "NEEDS_STATS",
    "MergeMethod",
    "MergeOptions",
    "ModelLike",
    "Source",
    "TensorSource",
    "TiesSemantics",
    "check_merge",
    "check_sources",
    "fisher_diagonal",
    "gram_matrices",
    "make_options",
    "merge",
    "merge_pieces",
    "merge_sources",
    "merge_state_dicts",
    "merge_tensor",
    "options_for",
]


ModelLike = nn.Module | Mapping[str, Tensor]


def options_for(name: str, opts: MergeOptions, overrides: Mapping[str, Mapping[str, Any]] | None) -> MergeOptions:
    """``opts`` with every ``overrides`` entry whose glob matches tensor ``name`` applied in order."""
    fields = {f.name for f in dataclasses.fields(MergeOptions)}
    for pattern, changes in (overrides or {}).items():
        if not fnmatch.fnmatchcase(name, pattern):
            continue
        bad = sorted(set(changes) - fields)
        if bad:
            raise BrickworkError(f"merge: overrides[{pattern!r}]: unknown option(s) {bad}; known: {sorted(fields)}")
        changes = {k: tuple(v) if k == "weights" and v is not None else v for k, v in changes.items()}
        opts = dataclasses.replace(opts, **changes)
    return opts


def check_sources(models: Sequence[Source], base: Source | None) -> list[str]:
    """The tensor names all inputs share; one :class:`BrickworkError` naming the first mismatch."""
    if not models:
        raise BrickworkError("merge: no models to merge")
    ref = models[0]
    names = ref.names()
    for s in [*models[1:], *([base] if base is not None else [])]:
        have = set(s.names())
        missing = [k for k in names if k not in have]
        extra = sorted(have - set(names))
        if missing:
            raise BrickworkError(
                f"merge: {s.label} lacks tensor {missing[0]!r} that {ref.label} has "
                f"({len(missing)} missing; different architectures?)"
            )
        if extra:
            raise BrickworkError(
                f"merge: {s.label} has tensor {extra[0]!r} that {ref.label} lacks "
                f"({len(extra)} extra; different architectures?)"
            )
        for k in names:
            (shape, dtype), (shape0, dtype0) = s.info(k), ref.info(k)
            if shape != shape0:
                raise BrickworkError(
                    f"merge: tensor {k!r}: shape {list(shape)} in {s.label}, {list(shape0)} in {ref.label}"
                )
            if dtype != dtype0:
                raise BrickworkError(f"merge: tensor {k!r}: dtype {dtype} in {s.label}, {dtype0} in {ref.label}")
    return names


def check_merge(
    models: Sequence[Source],
    opts: MergeOptions,
    *,
    base: Source | None = None,
    statistics: Sequence[Source] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, MergeOptions]:
    """Each tensor's options, after every input and option is checked (before anything is computed)."""
    names = check_sources(models, base)
    plans = {k: options_for(k, opts, overrides) for k in names}
    for k, o in plans.items():
        o.check(len(models), base is not None, k)
        check_stats(k, o, models, statistics)
    for s in statistics or []:
        unknown = sorted(set(s.names()) - set(names))
        if unknown:
            raise BrickworkError(f"merge: {s.label} has tensor {unknown[0]!r} that the models lack")
    return plans


def merge_sources(
    models: Sequence[Source],
    opts: MergeOptions,
    *,
    base: Source | None = None,
    statistics: Sequence[Source] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    chunk_elems: int = CHUNK,
) -> dict[str, Tensor]:
    """Every tensor merged; all inputs and options are checked before any tensor is computed."""
    plans = check_merge(models, opts, base=base, statistics=statistics, overrides=overrides)
    return {
        k: merge_tensor(k, models, o, base=base, stats=statistics, chunk_elems=chunk_elems) for k, o in plans.items()
    }


def _source(m: ModelLike, label: str) -> TensorSource:
    if isinstance(m, nn.Module):
        return TensorSource(m.state_dict(), label)
    if isinstance(m, Mapping):
        return TensorSource(m, label)
    raise BrickworkError(f"merge: {label} is a {type(m).__name__}, expected an nn.Module or a state dict")


def merge_state_dicts(
    states: Sequence[ModelLike],
    method: MergeMethod = "linear",
    *,
    base: ModelLike | None = None,
    statistics: Sequence[Mapping[str, Tensor]] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    chunk_elems: int = CHUNK,
    **options: Any,
) -> dict[str, Tensor]:
    """The merged state dict of ``states`` (modules or state dicts); options as :class:`MergeOptions`.

    ``chunk_elems`` is the engine's chunk size; DARE's masks are drawn per chunk, so a DARE merge
    is reproduced exactly (by :func:`~brickwork.ops.merge_files.merge_files` too) at equal chunk size.
    """
    opts = make_options(method, options)
    models = [_source(m, f"model {i}") for i, m in enumerate(states)]
    stats = None if statistics is None else [TensorSource(s, f"statistics {i}") for i, s in enumerate(statistics)]
    return merge_sources(
        models,
        opts,
        base=None if base is None else _source(base, "base"),
        statistics=stats,
        overrides=overrides,
        chunk_elems=chunk_elems,
    )


def make_options(method: str, options: Mapping[str, Any]) -> MergeOptions:
    """:class:`MergeOptions` from keyword options, one :class:`BrickworkError` for an unknown key."""
    fields = {f.name for f in dataclasses.fields(MergeOptions)}
    bad = sorted(set(options) - fields)
    if bad:
        raise BrickworkError(f"merge: unknown option(s) {bad}; known: {sorted(fields - {'method'})}")
    kw = dict(options)
    if kw.get("weights") is not None:
        kw["weights"] = tuple(kw["weights"])
    return MergeOptions(method=method, **kw)  # type: ignore[arg-type]


@register("op", "merge", injected=("base", "statistics", "data"))
def merge(
    models: Sequence[ModelLike],
    /,
    method: MergeMethod = "linear",
    *,
    base: ModelLike | None = None,
    statistics: Sequence[Mapping[str, Tensor]] | None = None,
    data: Iterable[Tensor | tuple[Tensor, Tensor]] | None = None,
    weights: list[float] | None = None,
    scale: float = 1.0,
    density: float | None = None,
    ties: TiesSemantics = "peft",
    t: float = 0.5,
    alpha: float = 1.0,
    ridge: float = 1e-6,
    eps: float = 1e-6,
    normalize: bool = False,
    seed: int = 0,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> nn.Module:
    """A new model: ``models`` (same architecture) merged by ``method``; inputs are not modified.

    Args:
        models: N modules or state dicts; the first module is copied as the result's structure.
        method: one of :data:`METHODS` (see :mod:`brickwork.ops.merge_engine` for each one's semantics).
        base: the pre-trained model the task vectors are taken from (task arithmetic, TIES,
            DARE, Model Stock).
        statistics: per model, diagonal Fishers (``fisher``: name -> tensor of the parameter's
            shape) or Gram matrices (``regmean``: ``path.weight`` -> (in, in)).
        data: instead of ``statistics``, batches (B, ...) or (x, y) to estimate them on:
            :func:`fisher_diagonal` (the model's own predictions) or :func:`gram_matrices`.
        weights, scale, density, ties, t, alpha, ridge, eps, normalize, seed: see :class:`MergeOptions`.
        overrides: module-path glob -> options (``{"head.*": {"method": "linear"}}``).

    Returns:
        A copy of the first module among ``models`` (or of ``base``) holding the merged state.
    """
    template = next((m for m in [*models, base] if isinstance(m, nn.Module)), None)
    if template is None:
        raise BrickworkError("merge: no nn.Module among the inputs to copy; use merge_state_dicts for state dicts")
    if statistics is None and data is not None and method in NEEDS_STATS:
        batches = list(data)
        if not all(isinstance(m, nn.Module) for m in models):
            raise BrickworkError(f"merge: {method} from data needs modules, not state dicts")
        estimate = fisher_diagonal if method == "fisher" else gram_matrices
        statistics = [estimate(m, batches) for m in models if isinstance(m, nn.Module)]
    state = merge_state_dicts(
        models,
        method,
        base=base,
        statistics=statistics,
        overrides=overrides,
        weights=weights,
        scale=scale,
        density=density,
        ties=ties,
        t=t,
        alpha=alpha,
        ridge=ridge,
        eps=eps,
        normalize=normalize,
        seed=seed,
    )
    out = copy.deepcopy(template)
    out.load_state_dict(state)
    return out
