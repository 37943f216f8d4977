"""Backend choice by measurement: the cache is written, read back, keyed, overridden and recovered
(with an injected fake timer, never the wall clock); every candidate computes the reference result."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from brickwork.errors import BrickworkError
from brickwork.kernels import autotune
from brickwork.kernels.autotune import Autotuner, ShapeClass
from brickwork.kernels.grouped import grouped_linear
from brickwork.nn.sparse import GroupLinear
from brickwork.nn.sparse.kernel import block_sparse_linear, sparse_paths

MOE = ShapeClass("moe", (4096, 512, 1024, 64), "float32", "fwd+bwd")
NAMES = ["grouped_mm", "split", "bmm"]


class FakeTimer:
    """Seconds per candidate from a table; counts the calls of each."""

    def __init__(self, seconds: dict[str, float]) -> None:
        self.seconds, self.calls = seconds, dict.fromkeys(seconds, 0)

    def __call__(self, name: str, fn: object) -> float:
        self.calls[name] += 1
        return self.seconds[name]


def _candidates() -> dict[str, object]:
    return {n: (lambda: None) for n in NAMES}


@pytest.fixture
def unpinned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BRICKWORK_BACKEND", raising=False)


def test_fastest_is_chosen_written_and_read_back_without_timing(tmp_path: Path, unpinned: None) -> None:
    path = tmp_path / "autotune.json"
    timer = FakeTimer({"grouped_mm": 3.0, "split": 1.0, "bmm": 2.0})
    tuner = Autotuner(path, timer=timer, machine="CPU A | torch 1")
    assert tuner.choose(MOE, NAMES, _candidates) == "split"
    assert tuner.made[MOE.key()].source == "measured"
    stored = json.loads(path.read_text())["machines"]["CPU A | torch 1"][MOE.key()]
    assert stored["backend"] == "split" and stored["seconds"] == {"grouped_mm": 3.0, "split": 1.0, "bmm": 2.0}
    # Bounded: budget 0.3 s is spent after the first timed round; min_rounds asks for a second,
    # so one warm-up + two rounds each.
    assert timer.calls == dict.fromkeys(NAMES, 3)

    # A fresh process (a new tuner) reads the file: no candidate is built or timed again.
    again = FakeTimer({"grouped_mm": 0.1, "split": 9.0, "bmm": 9.0})
    fresh = Autotuner(path, timer=again, machine="CPU A | torch 1")

    def never() -> dict[str, object]:
        raise AssertionError("a cached class must not be re-timed")

    assert fresh.choose(MOE, NAMES, never) == "split"
    assert fresh.made[MOE.key()].source == "cached" and fresh.timings == 0
    assert again.calls == dict.fromkeys(NAMES, 0)


def test_the_preferred_candidate_is_kept_unless_another_is_faster_by_the_margin(tmp_path: Path, unpinned: None) -> None:
    # split 5 % faster than grouped_mm (the first in KINDS order): within the 10 % margin, kept.
    near = Autotuner(tmp_path / "a.json", timer=FakeTimer({"grouped_mm": 1.0, "split": 0.95, "bmm": 2.0}))
    assert near.choose(MOE, NAMES, _candidates) == "grouped_mm"
    # 20 % faster: chosen; the preference follows the applicable order, not a fixed name.
    far = Autotuner(tmp_path / "b.json", timer=FakeTimer({"grouped_mm": 1.0, "split": 0.8, "bmm": 2.0}))
    assert far.choose(MOE, NAMES, _candidates) == "split"
    late = Autotuner(tmp_path / "c.json", timer=FakeTimer({"grouped_mm": 1.0, "split": 1.0, "bmm": 0.95}))
    assert late.choose(MOE, ["split", "bmm"], lambda: {n: (lambda: None) for n in ("split", "bmm")}) == "split"
    # Without a margin the plain fastest wins (the guard is the margin, not an order).
    plain = Autotuner(tmp_path / "d.json", timer=FakeTimer({"grouped_mm": 1.0, "split": 0.95, "bmm": 2.0}), margin=0)
    assert plain.choose(MOE, NAMES, _candidates) == "split"


def test_keys_separate_shape_class_cpu_model_and_torch_version(tmp_path: Path, unpinned: None) -> None:
    path = tmp_path / "autotune.json"
    Autotuner(path, timer=FakeTimer({"grouped_mm": 1.0, "split": 2.0, "bmm": 3.0}), machine="CPU A | torch 1").choose(
        MOE, NAMES, _candidates
    )
    slow_gmm = {"grouped_mm": 5.0, "split": 2.0, "bmm": 1.0}
    other_class = ShapeClass("moe", (4096, 512, 1024, 64), "float32", "fwd")
    for machine, shape in [("CPU B | torch 1", MOE), ("CPU A | torch 2", MOE), ("CPU A | torch 1", other_class)]:
        tuner = Autotuner(path, timer=FakeTimer(slow_gmm), machine=machine)
        assert tuner.choose(shape, NAMES, _candidates) == "bmm", (machine, shape)
        assert tuner.timings == 1
    machines = json.loads(path.read_text())["machines"]
    assert machines["CPU A | torch 1"][MOE.key()]["backend"] == "grouped_mm"  # not overwritten
    assert machines["CPU A | torch 1"][other_class.key()]["backend"] == "bmm"
    assert set(machines) == {"CPU A | torch 1", "CPU B | torch 1", "CPU A | torch 2"}


def test_env_override_pins_without_timing_and_rejects_bad_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "autotune.json"
    timer = FakeTimer({"grouped_mm": 1.0, "split": 2.0, "bmm": 3.0})
    tuner = Autotuner(path, timer=timer, machine="CPU A | torch 1")
    monkeypatch.setenv("BRICKWORK_BACKEND", "moe=bmm, sparse=gather")
    assert tuner.choose(MOE, NAMES, _candidates) == "bmm"
    assert tuner.made[MOE.key()].source == "pinned"
    assert not path.exists() and timer.calls == dict.fromkeys(NAMES, 0)
    # A pinned backend that cannot run these operands falls back to the first applicable one.
    assert tuner.choose(MOE, ["split"], _candidates) == "split"
    for bad, named in [("moe=fast", "grouped_mm, split, bmm"), ("gpu=split", "moe, sparse, malloc")]:
        monkeypatch.setenv("BRICKWORK_BACKEND", bad)
        with pytest.raises(BrickworkError, match=named):
            tuner.choose(MOE, NAMES, _candidates)


@pytest.mark.parametrize("content", ["{not json", '{"machines": [1, 2]}', "[]"])
def test_corrupt_cache_is_ignored_with_one_warning_and_rewritten(tmp_path: Path, unpinned: None, content: str) -> None:
    path = tmp_path / "autotune.json"
    path.write_text(content)
    tuner = Autotuner(path, timer=FakeTimer({"grouped_mm": 2.0, "split": 1.0, "bmm": 3.0}), machine="CPU A | torch 1")
    with pytest.warns(UserWarning, match="ignoring it") as caught:
        assert tuner.choose(MOE, NAMES, _candidates) == "split"
    assert len(caught) == 1
    assert json.loads(path.read_text())["machines"]["CPU A | torch 1"][MOE.key()]["backend"] == "split"


def test_failing_candidate_is_dropped(tmp_path: Path, unpinned: None) -> None:
    def fails() -> None:
        raise RuntimeError("unsupported here")

    tuner = Autotuner(tmp_path / "a.json", machine="CPU A | torch 1")  # the real timer, tiny no-op calls
    cands = {"grouped_mm": fails, "split": lambda: None}
    assert tuner.choose(MOE, ["grouped_mm", "split"], lambda: cands) == "split"


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BRICKWORK_CACHE_DIR", str(tmp_path / "a"))
    assert autotune.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("BRICKWORK_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert autotune.cache_dir() == tmp_path / "x" / "brickwork"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert autotune.cache_dir() == Path.home() / ".cache" / "brickwork"
    assert [autotune.bucket(n) for n in (0, 1, 2, 3, 64, 65)] == [1, 1, 2, 4, 64, 128]


def test_auto_layers_tune_once_per_class_on_real_operands(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The real path end to end: GroupLinear with path auto times its candidates once for the
    # (fwd+bwd) class, caches, and the result equals the masked-dense reference.
    monkeypatch.delenv("BRICKWORK_BACKEND")
    tuner = Autotuner(tmp_path / "c.json", timer=FakeTimer({"band": 2.0, "gather": 3.0, "dense": 1.0}), min_flops=0)
    monkeypatch.setattr(autotune, "TUNER", tuner)
    layer = GroupLinear(32, 32, groups=4, density=0.5, pattern="ring").double()
    x = torch.randn(6, 32, dtype=torch.float64)
    for _ in range(2):
        y = layer(x)
        y.sum().backward()
    assert tuner.timings == 1 and list(tuner.made.values())[0].backend == "dense"
    ref = F.linear(x, layer.dense_weight(), layer.bias)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-10)
    assert autotune.describe_choices().startswith("sparse ")  # recorded for reports


@pytest.mark.parametrize("pattern", ["ring", "random"])
def test_every_sparse_path_equals_the_masked_dense_reference(pattern: str) -> None:
    torch.manual_seed(0)
    layer = GroupLinear(48, 48, groups=6, density=0.5, pattern=pattern, edge_density=0.5).double()
    plan = layer.plan()
    assert ("band" in sparse_paths(plan)) == (pattern == "ring")
    x = torch.randn(5, 48, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 48, dtype=torch.float64)
    dense_w = layer.dense_weight().requires_grad_(True)
    ref = F.linear(x, dense_w, layer.bias)
    ref_grads = torch.autograd.grad(ref, [x, dense_w, layer.bias], g)
    ref_dw = ref_grads[1].view(6, 8, 48).gather(2, plan.fwd_rows.view(6, 1, -1).expand(6, 8, -1))
    for path in ["band", "gather", "dense"]:
        w = layer.effective_weight().detach().requires_grad_(True)
        y = block_sparse_linear(x, w, layer.bias, plan, path=path)  # type: ignore[arg-type]
        torch.testing.assert_close(y, ref, rtol=0, atol=1e-10)
        gx, gw, gb = torch.autograd.grad(y, [x, w, layer.bias], g)
        torch.testing.assert_close(gx, ref_grads[0], rtol=0, atol=1e-10)
        torch.testing.assert_close(gw, ref_dw, rtol=0, atol=1e-10)
        torch.testing.assert_close(gb, ref_grads[2], rtol=0, atol=1e-10)


@pytest.mark.parametrize("backend", ["split", "bmm"])
def test_float64_grouped_backends_equal_the_per_group_reference(backend: str) -> None:
    # grouped_mm has no float64 kernel on the CPU (float32 is checked in test_grouped_linear.py).
    counts = [3, 0, 5, 2]
    x = torch.randn(10, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 8, 6, dtype=torch.float64, requires_grad=True)
    ref = torch.cat([x[s : s + n] @ w[i] for i, (s, n) in enumerate(zip([0, 3, 3, 8], counts, strict=True))])
    y = grouped_linear(x, w, torch.tensor(counts), backend=backend)  # type: ignore[arg-type]
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-10)
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, [x, w], g), torch.autograd.grad(ref, [x, w], g), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_no_timing_under_a_flop_counter(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # FLOPs counted by analysis.compute must not include the candidates' timing calls.
    from brickwork.analysis.compute import FlopMeter

    monkeypatch.delenv("BRICKWORK_BACKEND")
    tuner = Autotuner(tmp_path / "c.json", timer=FakeTimer({"band": 2.0, "gather": 3.0, "dense": 1.0}), min_flops=0)
    monkeypatch.setattr(autotune, "TUNER", tuner)
    layer = GroupLinear(32, 32, groups=4, density=0.5, pattern="ring")
    x = torch.randn(6, 32)
    with torch.no_grad():
        with FlopMeter() as meter:
            layer(x)
        assert tuner.timings == 0 and not tuner.made
        assert meter.total == 2 * 6 * 32 * 16  # the connected half of the blocks, once
        layer(x)
    assert tuner.timings == 1


def test_small_calls_are_not_timed(tmp_path: Path, unpinned: None) -> None:
    tuner = Autotuner(tmp_path / "s.json", timer=FakeTimer({"grouped_mm": 3.0, "split": 1.0, "bmm": 2.0}))
    assert tuner.choose(MOE, NAMES, _candidates, flops=1e6) == "grouped_mm"
    assert tuner.made[MOE.key()].source == "small" and tuner.timings == 0 and not (tmp_path / "s.json").exists()
    assert tuner.choose(MOE, NAMES, _candidates, flops=1e9) == "split" and tuner.timings == 1


def test_the_malloc_setting_is_measured_once_per_setting_cached_and_pinnable(
    tmp_path: Path, unpinned: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from brickwork.kernels import malloc

    tuner = Autotuner(tmp_path / "autotune.json", machine="CPU A | torch 1")
    monkeypatch.setattr(autotune, "TUNER", tuner)
    measured: list[str] = []

    def measure(seconds: dict[str, float]) -> Callable[[str], float]:
        def one(setting: str) -> float:  # stands for one fresh process per setting
            measured.append(setting)
            return seconds[setting]

        return one

    # More than the margin faster than the preferred no-mmap: chosen, each setting measured once.
    assert (
        malloc.choose_malloc(measure({"no-mmap": 2.0, "tuned": 1.0, "default": 3.0}), (4096, 512, 64), "fwd+bwd")
        == "tuned"
    )
    assert sorted(measured) == sorted(malloc.SETTINGS)
    # Cached: the same class is not measured again, whatever a new measurement would say.
    assert (
        malloc.choose_malloc(measure({"no-mmap": 1.0, "tuned": 9.0, "default": 9.0}), (4096, 512, 64), "fwd+bwd")
        == "tuned"
    )
    assert len(measured) == len(malloc.SETTINGS)
    # Within the margin of no-mmap (5 % faster): no-mmap is kept.
    assert (
        malloc.choose_malloc(measure({"no-mmap": 1.0, "tuned": 0.95, "default": 0.95}), (2048, 512, 64), "fwd+bwd")
        == "no-mmap"
    )
    monkeypatch.setenv("BRICKWORK_BACKEND", "malloc=default")
    n = len(measured)
    assert malloc.choose_malloc(measure({}), (8192, 512, 64), "fwd+bwd") == "default" and len(measured) == n
    with pytest.raises(ValueError, match="unknown setting"):
        malloc.set_malloc("huge")


def test_the_wall_timer_measures_the_call_it_wraps() -> None:
    # No time is asserted: the measured span lies inside the span around it, and the call ran.
    import time

    ran: list[int] = []
    t0 = time.perf_counter()
    dt = autotune.wall_timer("split", lambda: ran.append(1))
    outer = time.perf_counter() - t0
    assert ran == [1] and 0.0 <= dt <= outer


def test_the_cache_warning_points_at_the_callers_line(tmp_path: Path, unpinned: None) -> None:
    path = tmp_path / "autotune.json"
    path.write_text("{not json")
    tuner = Autotuner(path, timer=FakeTimer({"grouped_mm": 2.0, "split": 1.0, "bmm": 3.0}), machine="CPU A | torch 1")
    with pytest.warns(UserWarning, match="ignoring it") as caught:
        tuner.choose(MOE, NAMES, _candidates)
    assert caught[0].filename == __file__  # this test's call, not autotune's internals


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="no /proc/cpuinfo")
def test_the_machine_key_names_the_first_cpus_model_and_numbers_and_the_torch_version() -> None:
    first = Path("/proc/cpuinfo").read_text().split("\n\n")[0]  # the first processor's block
    fields = dict((k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in first.splitlines()))
    if "model name" not in fields:
        pytest.skip("this CPU reports no model name")
    numbers = ", ".join(f"{k} {fields[k]}" for k in ("cpu family", "model", "stepping") if k in fields)
    want = fields["model name"] + (f" ({numbers})" if numbers else "")
    assert autotune.cpu_model() == want
    assert autotune.machine_key() == f"{want} | torch {torch.__version__}"
    if not torch.cuda.is_available():
        assert autotune.machine_key("cuda") == autotune.machine_key()  # no GPU to name: the CPU's key


def test_a_cache_of_an_older_version_is_measured_again_and_rewritten(tmp_path: Path, unpinned: None) -> None:
    path = tmp_path / "autotune.json"
    old = {"version": autotune.CACHE_VERSION - 1, "machines": {"CPU A | torch 1": {MOE.key(): {"backend": "bmm"}}}}
    path.write_text(json.dumps(old))
    tuner = Autotuner(path, timer=FakeTimer({"grouped_mm": 3.0, "split": 1.0, "bmm": 2.0}), machine="CPU A | torch 1")
    assert tuner.choose(MOE, NAMES, _candidates) == "split" and tuner.timings == 1  # not the old file's bmm
    data = json.loads(path.read_text())
    assert data["version"] == autotune.CACHE_VERSION
    assert data["machines"]["CPU A | torch 1"][MOE.key()]["backend"] == "split"
