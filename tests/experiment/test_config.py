"""Bad configs fail before any work with one clear message: key path, bad value, expectation."""

import copy
import dataclasses
from pathlib import Path
from typing import Annotated, Literal

import pytest
import yaml
from pydantic import Field

from brickwork.errors import ConfigError
from brickwork.experiment.config import apply_override, load_config, validate, validate_args
from brickwork.nn.routing import MoESettings
from brickwork.nn.sparse import RewiringSettings
from brickwork.nn.sparse.rewiring import StepsOrEpoch
from brickwork.registry import REGISTRY, Entry, Flatten, RegistryName
from brickwork.train import TrainSettings

CONFIGS = sorted(Path(__file__).resolve().parents[2].glob("configs/**/*.yaml"))


@pytest.fixture(scope="module")
def example_data(tmp_path_factory):
    """A folder holding ``examples/``, the files configs/data names, made as docs/data.md says."""
    import runpy

    folder = tmp_path_factory.mktemp("own-data")
    tool = runpy.run_path(str(Path(__file__).resolve().parents[2] / "tools" / "make_example_data.py"))
    tool["main"]([str(folder / "examples")])
    return folder


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path, request, monkeypatch):
    if path.parent.name == "data":  # their paths are relative: examples/... where the example files are made
        monkeypatch.chdir(request.getfixturevalue("example_data"))
    cfg = load_config(path)
    assert cfg.models and cfg.stages


def test_there_are_shipped_configs():
    assert any(p.name == "default.yaml" for p in CONFIGS)


def test_defaults_are_filled_in(tiny_config):
    cfg = validate(tiny_config)
    assert cfg.stages[0].args["settings"].weight_decay == 0.01  # a TrainSettings, built from flat keys
    assert cfg.models["mlp"].args["width"] == 32
    assert cfg.data.args["val_fraction"] == 0.1
    # The resolved config is itself a valid config that resolves to the same thing.
    assert validate(cfg.to_dict()) == cfg


def test_model_shorthand(tiny_config):
    del tiny_config["models"]
    tiny_config["model"] = {"name": "mlp-tiny"}
    assert list(validate(tiny_config).models) == ["mlp-tiny"]


def error(raw) -> str:
    with pytest.raises(ConfigError) as e:
        validate(raw)
    return str(e.value)


def test_unknown_top_level_key(tiny_config):
    tiny_config["stagse"] = []
    assert error(tiny_config) == (
        "stagse: unknown key; expected one of name, seed, seeds, device, threads, data, model, models, stages, "
        "aux_weights, log (got 'stagse'); did you mean 'stages'?"
    )


def test_unknown_model_argument_suggests_the_right_one(tiny_config):
    tiny_config["models"]["mlp"]["widht"] = 4
    assert error(tiny_config) == (
        "models.mlp.widht: unknown argument for model 'mlp'; expected width, depth, act, dropout (got 'widht'); "
        "did you mean 'width'?"
    )

    def g() -> None: ...

    with pytest.raises(ConfigError) as e:
        validate_args(Entry("brick", "g", g, ""), {"x": 1}, "m")
    assert str(e.value) == "m.x: unknown argument for brick 'g'; expected no arguments (got 'x')"


def test_wrong_type(tiny_config):
    tiny_config["stages"][0]["epochs"] = "ten"
    msg = error(tiny_config)
    assert msg.startswith("stages[0].epochs:") and "integer" in msg and "'ten'" in msg


def test_value_out_of_range(tiny_config):
    tiny_config["stages"][0]["lr"] = -1
    msg = error(tiny_config)
    assert msg.startswith("stages[0].lr:") and "greater than 0" in msg and "-1" in msg


def test_unknown_registry_names(tiny_config):
    tiny_config["models"]["mlp"]["name"] = "mlp-tinny"
    assert "models.mlp.name" in error(tiny_config) and "mlp-tiny" in error(tiny_config)


def test_close_matches_for_a_literal_inside_a_union_or_annotated():
    def f(
        a: Literal["split", "zero"] | None = None,
        b: Annotated[Literal["copy", "fresh"], Field(description="how")] = "copy",
    ) -> None: ...

    entry = Entry("brick", "f", f, "")
    with pytest.raises(ConfigError) as e:
        validate_args(entry, {"a": "splt"}, "m")
    assert str(e.value) == "m.a: input should be 'split' or 'zero' (got 'splt'); did you mean 'split'?"
    with pytest.raises(ConfigError) as e:
        validate_args(entry, {"b": "cpy"}, "m")
    assert str(e.value) == "m.b: input should be 'copy' or 'fresh' (got 'cpy'); did you mean 'copy'?"


def test_an_error_inside_a_union_member_has_the_key_path_of_the_value():
    """pydantic names the union member it tried (``list[int]``, ``constrained-int``); the path does not."""

    def f(
        a: list[int] | Literal["all"] = "all",
        b: StepsOrEpoch = 100,
        c: Annotated[str, Field(min_length=1)] | int = 0,
    ) -> None: ...

    entry = Entry("brick", "f", f, "")
    for args, message in [
        ({"a": [1, "x"]}, "m.a[1]: input should be a valid integer (got 'x')"),  # loc list[int], 1
        ({"b": 0}, "m.b: input should be greater than or equal to 1 (got 0)"),  # loc constrained-int
        ({"c": ""}, "m.c: string should have at least 1 character (got '')"),  # loc constrained-str
    ]:
        with pytest.raises(ConfigError) as e:
            validate_args(entry, args, "m")
        assert str(e.value) == message


def test_a_registry_name_inside_an_optional_is_checked():
    def f(opt: Annotated[str, RegistryName("optimizer")] | None = None) -> None: ...

    entry = Entry("brick", "f", f, "")
    assert validate_args(entry, {"opt": None}, "m") == {"opt": None}
    assert validate_args(entry, {"opt": "sgd"}, "m") == {"opt": "sgd"}
    with pytest.raises(ConfigError) as e:
        validate_args(entry, {"opt": "adamww"}, "m")
    assert str(e.value).startswith("m.opt: unknown optimizer name") and "did you mean 'adamw'" in str(e.value)


def test_unknown_stage_and_optimizer(tiny_config):
    tiny_config["stages"][0]["optimizer"] = "adamww"
    msg = error(tiny_config)
    assert msg.startswith("stages[0].optimizer:") and "'adamw'" in msg
    tiny_config["stages"][0] = {"stage": "trian"}
    assert "did you mean 'train'" in error(tiny_config)


def test_literal_choices(tiny_config):
    tiny_config["models"]["mlp"]["act"] = "gleu"
    msg = error(tiny_config)
    assert msg.startswith("models.mlp.act:") and "'gelu'" in msg


def test_missing_data_file(tiny_config, tmp_path):
    tiny_config["data"] = {"name": "csv", "path": str(tmp_path / "nope.csv"), "label": "y"}
    msg = error(tiny_config)
    assert msg.startswith("data.path:") and "file not found" in msg and "nope.csv" in msg


def test_missing_required_argument(tiny_config, tmp_path):
    f = tmp_path / "d.csv"
    f.write_text("a,y\n1,0\n")
    tiny_config["data"] = {"name": "csv", "path": str(f)}
    assert error(tiny_config) == "data.label: required argument of dataset 'csv' is missing"


def test_a_spec_without_its_name_key(tiny_config):
    del tiny_config["stages"][0]["stage"]
    assert error(tiny_config) == "stages[0].stage: missing; `brickwork ls stage` lists the names"


def test_missing_section(tiny_config):
    del tiny_config["stages"]
    assert error(tiny_config) == "stages: required key is missing"


def test_a_missing_config_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_config("nope.yaml")
    assert str(e.value) == f"config file 'nope.yaml' not found (paths are relative to {Path.cwd()})"


def test_malformed_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstages: [\n  - {stage: train\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert str(e.value) == f"{bad}: malformed YAML at line 3, column 3: expected the node content, but found '-'"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: a\nname: b\n", "c.yaml: duplicate key 'name' at line 2, column 1 (each key may appear once)"),
        ("- 1\n- 2\n", "c.yaml: expected a mapping of keys (name, data, models, stages) at the top (got [1, 2])"),
        ("", "c.yaml: expected a mapping of keys (name, data, models, stages) at the top (got None)"),
        (
            "name: x\n\tseed: 1\n",
            "c.yaml: malformed YAML at line 2, column 1: found character '\\t' that cannot start any token",
        ),
        # a reader error has no position mark and no `problem`: the first line of its text
        ("name: a\x07\n", "c.yaml: malformed YAML: unacceptable character #x0007: special characters are not allowed"),
    ],
)
def test_unreadable_config_files(tmp_path, monkeypatch, text, message):
    monkeypatch.chdir(tmp_path)
    Path("c.yaml").write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config("c.yaml")
    assert str(e.value) == message


def test_yaml_tags_never_construct_objects(tmp_path):
    bad = tmp_path / "evil.yaml"
    bad.write_text("name: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(bad)


def test_overrides(tiny_config):
    given = copy.deepcopy(tiny_config)
    cfg = load_config(tiny_config, ["stages[0].epochs=7", "models.mlp.width=8", "seed=3", "stages.1.split=val"])
    assert tiny_config == given  # the caller's mapping is left as it was
    assert cfg.stages[0].args["settings"].epochs == 7 and cfg.models["mlp"].args["width"] == 8 and cfg.seed == 3
    assert cfg.stages[1].args["split"] == "val"


def test_bad_overrides(tiny_config):
    with pytest.raises(ConfigError, match="not of the form"):
        apply_override(tiny_config, "epochs")
    with pytest.raises(ConfigError, match="index out of range"):
        apply_override(tiny_config, "stages[5].epochs=1")
    with pytest.raises(ConfigError, match="stages\\[0\\].epochs"):
        load_config(tiny_config, ["stages[0].epochs=0"])


def test_override_key_paths_and_values():
    raw = {"models": {"XL": {"name": "mlp"}}, "stages": [{"stage": "train"}, {"stage": "evaluate"}]}
    for item in ("models.XL.width=8", "stages[1].split=val", "stages.0.lr=0.5", "data.path=runs/a=b.csv"):
        apply_override(raw, item)
    apply_override(raw, "data.label=")  # an empty value is the empty string, not YAML's null
    apply_override(raw, "data.name=[digits")  # not YAML: the text as it was given
    assert raw == {
        "models": {"XL": {"name": "mlp", "width": 8}},  # a label with the brackets' neighbours kept
        "stages": [{"stage": "train", "lr": 0.5}, {"stage": "evaluate", "split": "val"}],
        "data": {"path": "runs/a=b.csv", "label": "", "name": "[digits"},  # the value may hold '='
    }


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("epochs", "override 'epochs' is not of the form key.path=value"),
        ("=3", "override '=3' is not of the form key.path=value"),
        ("stages[2].epochs=1", "stages.2: override index out of range: the list has 2 items (got '2')"),
        ("stages.x.epochs=1", "stages.x: override index out of range: the list has 2 items (got 'x')"),
        ("name.x=1", "name.x: override goes into a value that is not a mapping or list (got 'tiny')"),
        (
            "stages[0].stage.x=1",
            "stages.0.stage.x: override goes into a value that is not a mapping or list (got 'train')",
        ),
    ],
)
def test_bad_override_messages(tiny_config, item, message):
    with pytest.raises(ConfigError) as e:
        apply_override(tiny_config, item)
    assert str(e.value) == message


def test_config_round_trips_through_yaml(tiny_config):
    cfg = validate(tiny_config)
    assert validate(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg


def test_the_resolved_config_is_plain_data(tiny_config):
    """Tuples become lists and typed arguments (a teacher, a distill term) mappings; YAML can write it."""
    tiny_config["models"] = {"a": {"name": "mlp-tiny"}, "b": {"name": "mlp-tiny"}}
    tiny_config["stages"] = [
        {"stage": "stitch", "front": "a", "cuts": [[1, 2], [0, 1]]},
        {"stage": "distill", "teacher": {"variant": "a"}, "losses": {"kd": {"loss": "logit_kd", "weight": 0.5}}},
    ]
    cfg = validate(tiny_config)
    assert cfg.stages[0].args["cuts"] == [(1, 2), (0, 1)]
    stitch, distill = cfg.to_dict()["stages"]
    assert stitch["cuts"] == [[1, 2], [0, 1]] and all(type(c) is list for c in stitch["cuts"])
    assert distill["teacher"] == {
        "variant": "a",
        "current": False,
        "run": None,
        "model": None,
        "seed": None,
        "checkpoint": None,
        "pretrained": None,
        "bert": None,
    }
    assert distill["losses"] == {
        "kd": {
            "loss": "logit_kd",
            "weight": 0.5,
            "args": {},
            "student": "",
            "teacher": "",
            "student_io": "output",
            "teacher_io": "output",
            "adapter": False,
        }
    }
    assert validate(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg
    for spec in cfg.stages:  # validated arguments (typed objects, which JSON cannot hold) validate to themselves
        assert validate_args(spec.entry, spec.args, "s") == spec.args


# -- settings types: flat keys in a config, one typed object in the callable ------------------------

MOE = {"name": "moe_mlp", "width": 16, "depth": 1, "hidden": 8, "num_experts": 4}
G2G = {"name": "sparse_mlp", "width": 32, "depth": 1, "groups": 4, "density": 0.5}


def with_model(tiny_config, spec):
    tiny_config["models"] = {"m": spec}
    return tiny_config


def test_settings_are_built_from_flat_keys_and_written_back_flat(tiny_config):
    tiny_config["models"]["moe"] = {**MOE, "router": "hash", "top_k": 1}
    tiny_config["models"]["g2g"] = {**G2G, "regrow": "hebbian", "window": 5}
    cfg = validate(tiny_config)
    assert cfg.stages[0].args["settings"] == TrainSettings(epochs=3, batch_size=64, lr=0.01)
    assert cfg.models["moe"].args["routing"] == MoESettings(router="hash", top_k=1)
    assert cfg.models["g2g"].args["rewiring"] == RewiringSettings(regrow="hebbian", window=5)
    flat = cfg.to_dict()
    assert flat["stages"][0] == {
        "stage": "train",
        "epochs": 3,
        "batch_size": 64,
        "optimizer": "adamw",
        "lr": 0.01,
        "weight_decay": 0.01,
        "schedule": "cosine",
        "warmup_steps": 0,
        "loss": "cross_entropy",
        "label_smoothing": 0.0,
        "grad_clip": None,
        "nonfinite": "stop",
        "data_parallel": "ddp",
        "expert_parallel": None,
    }
    assert flat["models"]["moe"]["router"] == "hash" and "routing" not in flat["models"]["moe"]
    assert validate(yaml.safe_load(yaml.safe_dump(flat))) == cfg  # the resolved config re-validates


def test_a_settings_group_is_not_a_config_key(tiny_config):
    tiny_config["stages"][0] = {"stage": "train", "settings": {"epochs": 2}}
    msg = error(tiny_config)
    assert msg.startswith("stages[0].settings: unknown argument") and "epochs" in msg


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("epochs", 0, "greater than or equal to 1"),
        ("batch_size", "big", "integer"),
        ("lr", 0, "greater than 0"),
        ("label_smoothing", 1.0, "less than 1"),
        ("schedule", "cosin", "did you mean 'cosine'"),
        ("optimizer", "sgdd", "did you mean 'sgd'"),
        ("grad_clip", -1, "greater than 0"),
        ("epoch", 3, "did you mean 'epochs'"),
    ],
)
def test_train_settings_reject_bad_values_with_the_key_path(tiny_config, key, value, expected):
    tiny_config["stages"][0][key] = value
    msg = error(tiny_config)
    assert msg.startswith(f"stages[0].{key}:") and expected in msg


def test_nested_baselines_take_the_same_train_settings(tiny_config):
    tiny_config["stages"].append({"stage": "nested_baselines", "epochs": 2, "lr": 0.5, "label_smoothing": 0.1})
    assert validate(tiny_config).stages[2].args["training"] == TrainSettings(epochs=2, lr=0.5, label_smoothing=0.1)
    tiny_config["stages"][2]["lr"] = -1
    assert error(tiny_config).startswith("stages[2].lr:")


@pytest.mark.parametrize(
    ("extra", "key", "expected"),
    [
        ({"balance": "aux_los"}, "balance", "did you mean 'aux_loss'"),  # was a `str`: balancing silently off
        ({"router": "hsah"}, "router", "did you mean 'hash'"),
        ({"router": "dense_to_sparse", "top_k": 1}, "top_k", "router 'dense_to_sparse' does not use this setting"),
        ({"router": "expert_choice", "noise": "jitter"}, "noise", "does not use this setting"),
        ({"router": "hash", "balance": "aux_free"}, "balance", "does not use this setting"),
        ({"balance_rate": 0.01}, "balance_rate", "aux_free"),
        ({"top_k": 0}, "top_k", "greater than or equal to 1"),
        ({"capacity_factor": 0}, "capacity_factor", "greater than 0"),
    ],
)
def test_moe_settings_reject_bad_values_with_the_key_path(tiny_config, extra, key, expected):
    msg = error(with_model(tiny_config, {**MOE, **extra}))
    assert msg.startswith(f"models.m.{key}:") and expected in msg


def test_moe_settings_a_router_uses_pass(tiny_config):
    for extra in (
        {"router": "expert_choice", "top_k": 3},
        {"router": "topk", "balance": "aux_free", "balance_rate": 0.01},
        {"router": "sigmoid", "noise": "gaussian"},
        {"router": "dense_to_sparse", "balance": "none"},
    ):
        validate(with_model(tiny_config, {**MOE, **extra}))


@pytest.mark.parametrize(
    ("extra", "key", "expected"),
    [
        ({"regrow": "hebian"}, "regrow", "did you mean 'hebbian'"),
        ({"regrow": "random", "fraction": 1.5}, "fraction", "less than or equal to 1"),
        ({"regrow": "random", "window": 0}, "window", "greater than or equal to 1"),
        ({"regrow": "random", "interval": 0}, "interval", "greater than or equal to 1"),  # int | "epoch"
        ({"regrow": "random", "interval": "epochs"}, "interval", "valid integer (got 'epochs'); did you mean 'epoch'?"),
        ({"interval": 50}, "interval", "unused with regrow 'none'"),  # static wiring: it was silently ignored
    ],
)
def test_rewiring_settings_reject_bad_values_with_the_key_path(tiny_config, extra, key, expected):
    msg = error(with_model(tiny_config, {**G2G, **extra}))
    assert msg.startswith(f"models.m.{key}:") and expected in msg


def test_the_sparsify_stage_takes_every_rewiring_setting_of_sparse_mlp(tiny_config):
    """The two copies had drifted: the stage could not set ``window``. Now both take RewiringSettings."""
    stage = {"stage": "sparsify", "regrow": "hebbian", "window": 7, "momentum": 0.9}
    tiny_config["stages"].insert(1, stage)
    assert validate(tiny_config).stages[1].args["rewiring"] == RewiringSettings(
        regrow="hebbian", window=7, momentum=0.9
    )
    stage_keys = {p.name for p in REGISTRY.get("stage", "sparsify").params() if p.group == "rewiring"}
    model_keys = {p.name for p in REGISTRY.get("model", "sparse_mlp").params() if p.group == "rewiring"}
    assert stage_keys == model_keys == {f.name for f in dataclasses.fields(RewiringSettings)}


def test_ls_lists_settings_fields_with_types_and_defaults():
    described = [p.describe() for p in REGISTRY.get("stage", "train").params()]
    assert "lr: float (> 0) = 0.001" in described and "epochs: int (>= 1) = 10" in described
    described = {p.name: p.describe() for p in REGISTRY.get("model", "moe_mlp").params()}
    assert described["balance"] == "balance: Literal['aux_loss', 'aux_free', 'none'] = 'aux_loss'"
    assert described["router"] == "router: str (a router name) = 'topk'"


def test_a_settings_default_object_gives_the_defaults():
    @dataclasses.dataclass(frozen=True)
    class S:
        a: int = 1
        b: str = "x"

    def f(n: int = 0, s: Annotated[S, Flatten] = S(a=5)) -> None: ...  # noqa: B008

    entry = Entry("brick", "f", f, "")
    assert [(p.name, p.default, p.group) for p in entry.params()] == [("n", 0, None), ("a", 5, "s"), ("b", "x", "s")]
    assert entry.call_args({"n": 1, "b": "y"}) == {"n": 1, "s": S(a=5, b="y")}
    assert entry.flat_args({"n": 1, "s": S(a=2, b="z")}) == {"n": 1, "a": 2, "b": "z"}


def test_exponent_floats_are_numbers_in_configs_and_overrides(tmp_path):
    """PyYAML reads `1e-3` as a string; validation is strict, so the loader must read it as a float."""
    from brickwork.experiment import load_config

    path = tmp_path / "c.yaml"
    path.write_text("name: q\ndata: {name: digits}\nmodel: {name: mlp-tiny}\nstages: [{stage: train, lr: 1e-3}]\n")
    stage = load_config(path, ["stages[0].weight_decay=5E-4"]).to_dict()["stages"][0]
    assert stage["lr"] == 0.001 and stage["weight_decay"] == 0.0005
    assert load_config(path, ["stages[0].epochs=3"]).to_dict()["stages"][0]["epochs"] == 3  # ints stay ints
