"""Benchmark isolation and spreads: a cell runs in a fresh process with the parent's torch threads;
the spread of per-round ratios is exact on known samples; the machine line names CPU and caches."""

from __future__ import annotations

import os
import re

import pytest
import torch

from brickwork.analysis.timing import Samples, describe_machine, paired_ratio, process_facts, ratio_spread, run_cell
from brickwork.kernels import autotune
from brickwork.kernels.autotune import ShapeClass, describe_choices
from brickwork.kernels.malloc import SETTINGS, set_malloc


def test_ratio_spread_is_min_median_max_of_clean_paired_rounds() -> None:
    a = Samples([2.0, 3.0, 8.0, 4.0], [0.0, 0.0, 0.9, 0.0])
    b = Samples([1.0, 1.0, 1.0, 2.0], [0.0, 0.0, 0.0, 0.0])
    s = ratio_spread(a, b, max_foreign=0.5)  # round 3 is dropped: foreign load 0.9
    assert (s.min, s.median, s.max, s.rounds) == (2.0, 2.0, 3.0, 3)
    assert s.median == paired_ratio(a, b, 0.5)
    everything = ratio_spread(a, b)
    assert (everything.min, everything.max, everything.rounds) == (2.0, 8.0, 4)
    assert str(s) == "2.000 [2.000-3.000]"


def test_cells_run_in_a_fresh_process_with_the_parents_threads() -> None:
    # One spawn (a worker imports torch: seconds on a loaded machine).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pid, threads, malloc = run_cell(process_facts, malloc_setting="tuned")
        assert pid != os.getpid() and threads == 1 and "M_MMAP_THRESHOLD" in malloc and "M_MMAP_MAX" not in malloc
        autotune.choose(ShapeClass("moe", (1,), "float32", "fwd"), ["split"])
        assert run_cell(describe_choices, in_process=True) == describe_choices() != "none"
        assert run_cell(process_facts, in_process=True)[0] == os.getpid()
    finally:
        torch.set_num_threads(before)
        set_malloc("no-mmap")


def test_machine_line_names_cpu_model_caches_cores_and_load() -> None:
    line = describe_machine("no-mmap")
    assert line.startswith(f"CPU {autotune.cpu_model()}; caches ")
    assert re.search(r"\d+ cores, \d+ visible; load average [\d.]+ [\d.]+ [\d.]+;", line)
    assert "L2 " in line or "caches unknown" in line


def test_malloc_settings_apply_by_name_and_reject_others() -> None:
    texts = {name: set_malloc(name) for name in SETTINGS}
    set_malloc("no-mmap")  # the setting the test process runs under (conftest pins malloc=no-mmap)
    if "unavailable" not in texts["tuned"]:
        assert "M_MMAP_MAX=0" in texts["no-mmap"] and "M_MMAP_MAX" not in texts["tuned"]
        assert texts["default"] == "glibc defaults"
    with pytest.raises(ValueError, match="no-mmap, tuned, default"):
        set_malloc("huge")
