"""Grids of merge options, for choosing a method's hyper-parameters on held-out data.

Task-arithmetic, TIES and RegMean papers (Ilharco et al., 2023; Yadav et al., 2023; Jin et al.,
2023) choose the scaling λ, the density, the Gram's off-diagonal reduction on a **validation**
split, never on the test split they report. :func:`grid_points` expands one method's grid
(option -> candidate values) into the options of every point, in a fixed order, each checked by
:func:`brickwork.ops.merge.make_options` before any merge runs; the caller merges at every point,
scores it on validation data and keeps the best (:func:`best_point`).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

from brickwork.errors import BrickworkError
from brickwork.ops.merge import make_options


def grid_points(method: str, base: Mapping[str, Any], grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of ``grid``'s values laid over ``base`` (the method's fixed options).

    Args:
        method: the merge method the options are for.
        base: options every point shares (a grid value of the same key replaces it).
        grid: option name -> candidate values (at least one each).

    Returns:
        One options dict per point: the Cartesian product, the last key varying fastest (keys in
        ``grid``'s order); ``[dict(base)]`` for an empty grid.

    Raises:
        BrickworkError: an option with no candidate, or a name :class:`~brickwork.ops.merge.MergeOptions`
            does not know (the message names the method).
    """
    empty = [k for k, v in grid.items() if len(v) == 0]
    if empty:
        raise BrickworkError(f"merge grid of {method}: option(s) {empty} have no candidate value")
    keys = list(grid)
    points = [
        {**base, **dict(zip(keys, values, strict=True))} for values in itertools.product(*(grid[k] for k in keys))
    ]
    for p in points:
        try:
            make_options(method, p)
        except BrickworkError as e:
            raise BrickworkError(f"merge grid of {method}: {e}") from None
    return points


def best_point(scores: Sequence[float]) -> int:
    """Index of the highest score; the first of equal ones (the grid's order breaks ties).

    Raises:
        BrickworkError: no scores, or a score that is NaN.
    """
    if not scores or any(s != s for s in scores):
        raise BrickworkError(f"merge grid: cannot choose among scores {list(scores)}")
    return max(range(len(scores)), key=lambda i: (scores[i], -i))
