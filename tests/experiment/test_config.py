"""Bad configs fail before any work with one clear message: key path, bad value, expectation."""

from pathlib import Path

import pytest
import yaml

from brickwork.errors import ConfigError
from brickwork.experiment.config import apply_override, load_config, validate

CONFIGS = sorted(Path(__file__).resolve().parents[2].glob("configs/**/*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.models and cfg.stages


def test_there_are_shipped_configs():
    assert any(p.name == "default.yaml" for p in CONFIGS)


def test_defaults_are_filled_in(tiny_config):
    cfg = validate(tiny_config)
    assert cfg.stages[0].args["weight_decay"] == 0.01
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
    msg = error(tiny_config)
    assert msg.startswith("stagse:") and "unknown key" in msg and "'stages'" in msg


def test_unknown_model_argument_suggests_the_right_one(tiny_config):
    tiny_config["models"]["mlp"]["widht"] = 4
    msg = error(tiny_config)
    assert msg.startswith("models.mlp.widht:") and "did you mean 'width'" in msg


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
    assert error(tiny_config).startswith("data.label: required argument")


def test_missing_section(tiny_config):
    del tiny_config["stages"]
    assert error(tiny_config).startswith("stages: required key is missing")


def test_malformed_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstages: [\n  - {stage: train\n")
    with pytest.raises(ConfigError, match=r"malformed YAML at line \d+, column \d+"):
        load_config(bad)


def test_yaml_tags_never_construct_objects(tmp_path):
    bad = tmp_path / "evil.yaml"
    bad.write_text("name: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(bad)


def test_overrides(tiny_config):
    cfg = load_config(tiny_config, ["stages[0].epochs=7", "models.mlp.width=8", "seed=3", "stages.1.split=val"])
    assert cfg.stages[0].args["epochs"] == 7 and cfg.models["mlp"].args["width"] == 8 and cfg.seed == 3
    assert cfg.stages[1].args["split"] == "val"


def test_bad_overrides(tiny_config):
    with pytest.raises(ConfigError, match="not of the form"):
        apply_override(tiny_config, "epochs")
    with pytest.raises(ConfigError, match="index out of range"):
        apply_override(tiny_config, "stages[5].epochs=1")
    with pytest.raises(ConfigError, match="stages\\[0\\].epochs"):
        load_config(tiny_config, ["stages[0].epochs=0"])


def test_config_round_trips_through_yaml(tiny_config):
    cfg = validate(tiny_config)
    assert validate(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg
