"""Grids of merge options: the product in a fixed order, checked names, the first best point."""

import pytest

from brickwork.errors import BrickworkError
from brickwork.ops.merge_grid import best_point, grid_points


def test_points_are_the_product_over_the_fixed_options_last_key_fastest():
    pts = grid_points("ties", {"density": 0.2, "ties": "mergekit"}, {"density": [0.1, 0.5], "scale": [1.0, 2.0]})
    assert pts == [
        {"density": 0.1, "ties": "mergekit", "scale": 1.0},
        {"density": 0.1, "ties": "mergekit", "scale": 2.0},
        {"density": 0.5, "ties": "mergekit", "scale": 1.0},
        {"density": 0.5, "ties": "mergekit", "scale": 2.0},
    ]
    assert grid_points("linear", {"t": 0.3}, {}) == [{"t": 0.3}]


def test_bad_grids_are_refused_naming_the_method():
    with pytest.raises(BrickworkError, match=r"merge grid of regmean: merge: unknown option\(s\) \['lambda'\]"):
        grid_points("regmean", {}, {"lambda": [0.5]})
    with pytest.raises(BrickworkError, match=r"merge grid of ties: option\(s\) \['density'\] have no candidate"):
        grid_points("ties", {}, {"density": []})


def test_best_point_takes_the_first_of_equal_scores_and_refuses_nan():
    assert best_point([0.5, 0.9, 0.9, 0.1]) == 1
    assert best_point([0.2]) == 0
    with pytest.raises(BrickworkError, match="cannot choose"):
        best_point([0.5, float("nan")])
    with pytest.raises(BrickworkError, match="cannot choose"):
        best_point([])
