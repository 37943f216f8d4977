"""`brickwork bench distill` runs and prints its table (figures are not asserted: they are timings)."""

from __future__ import annotations

import pytest

from brickwork.bench.distill import CASES, main


def test_bench_prints_one_row_of_ratios(capsys: pytest.CaptureFixture[str]) -> None:
    case = next(c for c in CASES if c.startswith("mlp"))
    assert main(["--cases", case, "--steps", "1", "--repeats", "1", "--threads", "1", "--in-process"]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"| {case}")]
    assert len(row) == 1
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    # "median [min-max]" spreads, then 1 - teacher share (noisy, any sign)
    distill_vs_hand, cached_vs_live, _ = (float(c.split(" ")[0]) for c in cells[1:4])
    assert distill_vs_hand > 0 and cached_vs_live > 0
