"""`brickwork slice`: a standalone checkpoint of a nested sub-network that loads back and equals
the supernet at that width and depth; never overwrites; one-line errors."""

import pytest
import torch

from brickwork.cli import main
from brickwork.experiment import RunStore, execute, validate
from brickwork.experiment.artifacts import load_trained
from brickwork.experiment.build import load


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    cfg = {
        "name": "slice",
        "seed": 0,
        "threads": 1,
        "data": {"name": "digits"},
        "models": {
            "sn": {"name": "nested_mlp", "width": 24, "depth": 3, "depths": [2, 3]},
            "plain": {"name": "mlp", "width": 8, "depth": 1},
        },
        "stages": [{"stage": "train", "epochs": 1, "lr": 0.01}],
    }
    rec = execute(validate(cfg), RunStore(runs), progress=False, echo=lambda s: None)
    return runs, rec


def test_slice_writes_a_standalone_checkpoint_that_equals_the_supernet(trained_run, capsys):
    runs, rec = trained_run
    assert main(["--runs-dir", str(runs), "slice", rec.id, "--model", "sn", "--width", "0.5", "--depth", "2"]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "max |sliced - supernet| = 0.00e+00" in out
    stem = rec.dir / "sn" / "slice-w0p5-d2"
    assert stem.with_name("slice-w0p5-d2.safetensors").exists() and stem.with_name("slice-w0p5-d2.json").exists()
    small = load(stem).model.eval()
    supernet = load_trained(RunStore(runs), rec.id, "sn").model.eval()
    x = torch.rand(16, 1, 8, 8) * 16
    with torch.no_grad(), supernet.at(0.5, 2):
        torch.testing.assert_close(small(x), supernet(x))
    assert len(small.body) == 2 and small.head.proj.weight.shape == (10, 12)
    # Never overwritten: the same command fails with one line, the file is unchanged.
    before = stem.with_suffix(".safetensors").read_bytes()
    assert main(["--runs-dir", str(runs), "slice", rec.id, "--model", "sn", "--width", "0.5", "--depth", "2"]) == 2
    assert "exists" in capsys.readouterr().err
    assert stem.with_suffix(".safetensors").read_bytes() == before


def test_slice_to_a_chosen_path_and_bad_input(trained_run, tmp_path, capsys):
    runs, rec = trained_run
    out = tmp_path / "small.safetensors"
    assert main(["--runs-dir", str(runs), "slice", rec.id, "--model", "sn", "--width", "0.25", "--out", str(out)]) == 0
    assert len(load(tmp_path / "small").model.body) == 3
    capsys.readouterr()
    for args, message in [
        (["--model", "plain", "--width", "0.5"], "not a nested model"),
        (["--model", "sn", "--width", "0.5", "--out", str(tmp_path / "a.b")], "without dots"),
        (["--model", "sn", "--width", "1.5"], "--width"),
        (["--model", "sn", "--width", "0.5", "--depth", "4"], "--depth"),
        (["--width", "0.5"], "name one with --model"),
    ]:
        assert main(["--runs-dir", str(runs), "slice", rec.id, *args]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
