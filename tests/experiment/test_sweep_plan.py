"""Planning a sweep: axes from overrides and the ``sweep:`` block, the grid, and every refusal."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from brickwork.cli import main
from brickwork.errors import BrickworkError, ConfigError
from brickwork.experiment.sweep import MAX_POINTS, canonical_key, plan_sweep, split_items

LR, WIDTH = "stages[0].lr", "models.mlp.width"


def test_the_grid_is_the_cartesian_product_first_axis_slowest(tiny_config):
    plan = plan_sweep(tiny_config, ["stages.0.lr=1e-3,3e-3", "models.mlp.width=16,32,64", "stages[0].epochs=1"])
    assert plan is not None
    assert plan.axes == [(LR, [1e-3, 3e-3]), (WIDTH, [16, 32, 64])]
    assert plan.values == [{LR: lr, WIDTH: w} for lr in (1e-3, 3e-3) for w in (16, 32, 64)]
    for values, cfg in zip(plan.values, plan.configs, strict=True):
        assert cfg.stages[0].args["settings"].lr == values[LR] and cfg.models["mlp"].args["width"] == values[WIDTH]
        assert cfg.stages[0].args["settings"].epochs == 1  # the plain override applies to every point
    assert plan_sweep(tiny_config, ["stages[0].epochs=1"]) is None  # no axis: a plain run


def test_the_sweep_block_is_the_same_sweep(tiny_config):
    from_cli = plan_sweep(tiny_config, ["stages[0].lr=1e-3,3e-3", "models.mlp.width=16,32"])
    block = {**tiny_config, "sweep": {"stages.0.lr": [1e-3, 3e-3], "models.mlp.width": [16, 32]}}
    from_block = plan_sweep(block)
    assert from_cli is not None and from_block is not None
    assert from_block.axes == from_cli.axes and from_block.values == from_cli.values
    assert [c.to_dict() for c in from_block.configs] == [c.to_dict() for c in from_cli.configs]
    mixed = plan_sweep({**tiny_config, "sweep": {LR: [1e-3, 3e-3]}}, ["models.mlp.width=16,32"])
    assert mixed is not None and mixed.values == from_cli.values  # block axes first, then the command line's


def test_commas_inside_brackets_braces_or_quotes_do_not_split():
    assert split_items("1,2") == ["1", "2"]
    assert split_items("[1,2]") == ["[1,2]"]
    assert split_items("[1,2],[3,4]") == ["[1,2]", "[3,4]"]
    assert split_items("{a: 1, b: 2},x") == ["{a: 1, b: 2}", "x"]
    assert split_items("\"a,b\",'c,d',e") == ['"a,b"', "'c,d'", "e"]
    assert split_items(r'"a\",b",c') == [r'"a\",b"', "c"]
    assert canonical_key("stages.0.lr") == canonical_key("stages[0].lr") == "stages[0].lr"


def test_a_list_value_stays_one_value(tiny_config):
    tiny_config["models"]["mlp"] = {"name": "mlp-tiny"}
    assert plan_sweep(tiny_config, ["seeds=[0,1]"]) is None  # a plain override: one list value
    plan = plan_sweep(tiny_config, ["seeds=[0,1],[2]"])
    assert plan is not None and plan.values == [{"seeds": [0, 1]}, {"seeds": [2]}]


@pytest.mark.parametrize(
    ("overrides", "block", "message"),
    [
        (["stages[0].lr=0.01,"], None, r"stages\[0\].lr: sweep value 2 of 2 is empty"),
        ([], {LR: []}, r"stages\[0\].lr: empty sweep axis"),
        ([], {LR: 0.01}, r"sweep.stages\[0\].lr: expected a list of values"),
        ([], {}, r"sweep: expected a mapping"),
        (["stages[0].lr=0.01,1e-2"], None, r"stages\[0\].lr: sweep value 1e-2 is given twice"),
        (["stages[0].lr=1,2", "stages.0.lr=3,4"], None, r"stages\[0\].lr: is swept twice"),
        ([f"{LR}=1,2"], {LR: [3, 4]}, r"stages\[0\].lr: is swept twice"),
        (["stages[0]={stage: evaluate},{stage: train}", "stages[0].lr=1,2"], None, "overlaps the axis"),
        (["stages[0].lr=0.1", "stages[0].lr=1,2"], None, r"stages\[0\].lr: is set by a plain override and swept"),
        (
            ["models.mlp.depth=1", "models.mlp={name: mlp},{name: mlp-tiny}"],
            None,
            r"models.mlp.depth: is set by a plain",
        ),
        (
            ["models.mlp.widht=16,32"],
            None,
            r"^sweep point 1 of 2 \(models.mlp.widht=16\): models.mlp.widht: unknown argument .*did you mean 'width'",
        ),
        (["modls.mlp.width=16,32"], None, r"sweep point 1 of 2 .*modls: unknown key.*did you mean 'models'"),
        (
            ["models.mlp.width=16,-3"],
            None,
            r"^sweep point 2 of 2 \(models.mlp.width=-3\): models.mlp.width: input should be greater",
        ),
    ],
)
def test_bad_sweeps_are_one_line_naming_the_key(tiny_config, overrides, block, message):
    if block is not None:
        tiny_config["sweep"] = block
    with pytest.raises(BrickworkError, match=message) as e:
        plan_sweep(tiny_config, overrides)
    assert "\n" not in str(e.value)


def test_a_model_that_cannot_be_built_is_found_before_any_point_runs(tiny_config):
    with pytest.raises(BrickworkError, match=r"^sweep point 2 of 2 \(models.mlp.width=3000000000\): models.mlp: "):
        plan_sweep(tiny_config, ["models.mlp.width=16,3000000000"])  # what `run` checks, for every point


def test_a_large_grid_needs_yes(tiny_config):
    side = int(MAX_POINTS**0.5) + 1
    axes = [f"stages[0].lr={','.join(str(i + 1) for i in range(side))}", f"seed={','.join(map(str, range(side)))}"]
    with pytest.raises(ConfigError, match=f"{side * side} points .* more than {MAX_POINTS}; pass --yes"):
        plan_sweep(tiny_config, axes)


def test_the_cli_refuses_a_bad_point_and_writes_nothing(tiny_config, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**tiny_config, "sweep": {WIDTH: [16, 0]}}))
    runs = tmp_path / "runs"
    for argv in (["validate", str(cfg)], ["--runs-dir", str(runs), "run", str(cfg)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "sweep point 2 of 2 (models.mlp.width=0): models.mlp.width:" in err
    assert not runs.exists()
    cfg.write_text(yaml.safe_dump({**tiny_config, "sweep": {WIDTH: [16, 32]}}))
    assert main(["validate", str(cfg), "stages[0].lr=0.01,0.02"]) == 0
    assert "valid sweep of 4 points over models.mlp.width (2), stages[0].lr (2)" in capsys.readouterr().out
    assert not Path(runs).exists()
