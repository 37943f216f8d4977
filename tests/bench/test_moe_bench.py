"""`brickwork bench moe` at tiny shapes: every baseline computes moe's function (checked inside),
each ratio comes from its own rotation, and the table prints."""

import torch

from brickwork.bench.moe import bench_one, main


def test_bench_one_reports_both_rotations():
    r = bench_one(64, 16, 4, 2, "fwd+bwd", repeats=1, warmup=0, loops=["stacked", "modules"], max_foreign=1.0)
    assert set(r.ratios) == {("moe", "dense"), ("loop_stacked", "moe"), ("loop_modules", "moe")}
    assert all(0 < v.min <= v.median <= v.max for v in r.ratios.values()) and set(r.seconds) == {
        "moe",
        "dense",
        "loop_stacked",
        "loop_modules",
    }
    alone = bench_one(64, 16, 4, 2, "fwd", repeats=1, warmup=0, loops=[], max_foreign=1.0)
    assert set(alone.ratios) == {("moe", "dense")}


def test_main_prints_the_table(capsys):
    before = torch.get_num_threads()
    try:
        assert (
            main(
                [
                    "--tokens",
                    "32",
                    "--dims",
                    "16",
                    "--experts",
                    "4",
                    "--top-k",
                    "1",
                    "--modes",
                    "fwd",
                    "--repeats",
                    "1",
                    "--warmup",
                    "0",
                    "--max-foreign",
                    "1.0",
                    "--threads",
                    "1",
                    "--malloc",
                    "default",
                    "--in-process",
                ]
            )
            == 0
        )
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr().out
    assert "| 32 | 16 | 4 | 1 | fwd |" in out and "moe / dense" in out
    assert "CPU " in out and "load average after" in out
