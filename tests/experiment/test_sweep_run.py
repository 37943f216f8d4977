"""Running a sweep: SIGKILL mid-sweep, resume, identical weights per point; show, report, runs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from brickwork.cli import main
from brickwork.errors import BrickworkError
from brickwork.experiment import RunStore
from brickwork.experiment.sweep import plan_sweep, run_sweep
from brickwork.persist import load_tensors

ROOT = Path(__file__).resolve().parents[2]
AXES = ["stages[0].lr=0.01,0.02", "models.mlp.width=16,24"]


@pytest.fixture
def sweep_config(tiny_config):
    tiny_config["stages"][0]["epochs"] = 10  # long enough to be killed inside the third point
    tiny_config["threads"] = 1  # the same kernels in this process and in the killed one
    threads = torch.get_num_threads()
    yield tiny_config
    torch.set_num_threads(threads)


def _weights(store: RunStore, sweep_id: str) -> dict[int, dict[str, torch.Tensor]]:
    return {i: load_tensors(r.dir / "mlp" / "model")[0] for i, r in store.sweep_runs(sweep_id).items()}


def test_a_killed_sweep_resumes_to_the_weights_of_an_uninterrupted_one(sweep_config, tmp_path, capsys):
    plan = plan_sweep(sweep_config, AXES)
    assert plan is not None
    reference = RunStore(tmp_path / "ref")
    want = _weights(reference, run_sweep(plan, reference, progress=False, echo=lambda s: None).id)
    assert sorted(want) == [0, 1, 2, 3]

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(sweep_config))
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "brickwork", "--runs-dir", str(runs), "run", str(cfg), *AXES, "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 240
    while len(list(runs.glob("*/mlp/stage0-train_state.json"))) < 3:  # the third point trained an epoch
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.kill()
    proc.wait()

    store = RunStore(runs)
    (sweep_row,) = {r.point.sweep for r in store.list() if r.point is not None}
    before = store.sweep_runs(sweep_row)
    assert [before[i].status for i in sorted(before)] == ["completed", "completed", "stale"]
    assert not (before[2].dir / "mlp" / "progress.json").exists()  # killed inside its training
    assert main(["--runs-dir", str(runs), "show", sweep_row]) == 0
    out = capsys.readouterr().out
    assert "4 points, 2 completed" in out and "| 3 | 0.02 | 16 |" in out and "| 4 | 0.02 | 24 |" in out
    assert out.count("not started") == 1 and out.count(" stale ") == 1

    assert main(["--runs-dir", str(runs), "run", "--resume", sweep_row[:20], "--no-progress"]) == 0
    after = store.sweep_runs(sweep_row)
    assert all(r.status == "completed" for r in after.values()) and sorted(after) == [0, 1, 2, 3]
    for i in (0, 1):  # finished points are kept as they were: same run, same end
        assert after[i].id == before[i].id and after[i].ended == before[i].ended
    assert after[2].id == before[2].id  # the interrupted point resumed in its own run
    got = _weights(store, sweep_row)
    for i in range(4):
        assert got[i].keys() == want[i].keys() and all(torch.equal(got[i][k], want[i][k]) for k in want[i]), i
    assert [after[i].point.values for i in range(4)] == plan.values  # type: ignore[union-attr]

    out = capsys.readouterr().out
    assert "completed as run" in out and "resuming run" in out and "sweep report:" in out
    with pytest.raises(BrickworkError, match="already completed"):
        from brickwork.experiment.sweep import resume_sweep

        resume_sweep(store, sweep_row)

    assert main(["--runs-dir", str(runs), "report", sweep_row]) == 0
    out = capsys.readouterr().out
    folder = runs / sweep_row
    table = [line for line in out.splitlines() if line.startswith("| ") and "completed" in line]
    assert len(table) == 4 and out.startswith(f"# tiny — sweep {sweep_row}")
    for i, r in after.items():  # each row: the point's values, its run's final accuracy and FLOPs
        m = r.metrics["mlp"]
        cells = f"| {i + 1} | {plan.values[i]['stages[0].lr']} | {plan.values[i]['models.mlp.width']} | "
        assert any(line.startswith(cells + f"{m['test_accuracy']:.4f} |") for line in table), cells
        assert f"{m['flops_per_sample']:,.0f}" in next(line for line in table if line.startswith(cells))
    for png in ("accuracy_vs_flops.png", "accuracy_vs_stages_0_.lr.png", "accuracy_vs_models.mlp.width.png"):
        assert (folder / png).stat().st_size > 0 and f"]({png})" in out
    assert (folder / "report.md").read_text() in out and (folder / "sweep.yaml").exists()

    assert main(["--runs-dir", str(runs), "runs"]) == 0
    listed = capsys.readouterr().out
    assert all(f"{sweep_row} ({i})" in listed for i in range(1, 5))


def test_a_failed_point_does_not_stop_the_sweep_and_ctrl_c_stops_it_resumably(tiny_config, tmp_path, monkeypatch):
    from brickwork.experiment.sweep import resume_sweep
    from brickwork.train import loop

    tiny_config["stages"][0]["epochs"] = 1
    lines: list[str] = []
    store = RunStore(tmp_path / "runs")
    plan = plan_sweep(tiny_config, ["stages[0].lr=1e30,0.01"])  # the first diverges: a non-finite loss
    assert plan is not None
    with pytest.raises(BrickworkError, match=r"^sweep sweep-\S+: point\(s\) 1 of 2 failed .* --resume sweep-"):
        run_sweep(plan, store, progress=False, echo=lines.append)
    (sweep_id,) = {r.point.sweep for r in store.list() if r.point is not None}
    runs = store.sweep_runs(sweep_id)
    assert runs[0].status == "failed" and "non-finite" in (runs[0].error or "") and runs[1].status == "completed"
    assert any("point 1/2 (stages[0].lr=1e+30): failed: train mlp: non-finite" in line for line in lines)
    assert "| 1 | 1e+30 | " in (tmp_path / "runs" / sweep_id / "report.md").read_text()

    real, calls = loop.train_step, {"n": 0}

    def step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # Ctrl-C inside the retried point (before its diverging step)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", step)
    with pytest.raises(KeyboardInterrupt):
        resume_sweep(store, sweep_id, echo=lines.append)
    assert store.sweep_runs(sweep_id)[0].status == "interrupted" and lines[-1].endswith(f"--resume {sweep_id}")
    assert store.sweep_runs(sweep_id)[1].ended == runs[1].ended  # the completed point was not touched
