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


def test_auto_malloc_times_moes_step_once_per_setting_each_in_a_fresh_process(tmp_path, monkeypatch):
    from brickwork.bench import moe as bench_moe
    from brickwork.kernels import autotune
    from brickwork.kernels.malloc import SETTINGS, set_malloc

    monkeypatch.setenv("BRICKWORK_BACKEND", "moe=grouped_mm")  # malloc unpinned
    monkeypatch.setattr(autotune, "TUNER", autotune.Autotuner(tmp_path / "autotune.json", machine="CPU A | torch 1"))
    calls = []

    def fresh_process(fn, *args, malloc_setting):  # stands for analysis.timing.isolated
        calls.append((fn, args, malloc_setting))
        assert fn(*args) > 0.0  # the real step, timed in this process
        return {"no-mmap": 2.0, "tuned": 1.0, "default": 3.0}[malloc_setting]

    monkeypatch.setattr(bench_moe, "isolated", fresh_process)
    try:
        r = bench_one(64, 16, 4, 2, "fwd+bwd", repeats=1, warmup=0, loops=[], max_foreign=1.0)
    finally:
        set_malloc("no-mmap")  # the setting the suite runs under
    assert sorted(c[2] for c in calls) == sorted(SETTINGS)
    assert all(fn is bench_moe.moe_step_seconds and args == (64, 16, 4, 2, "fwd+bwd") for fn, args, _ in calls)
    assert r.backend.endswith("malloc tuned")
