import pytest
import torch

from brickwork.errors import CheckpointError
from brickwork.persist import load_tensors, save_tensors
from brickwork.train.checkpoint import load_model, save_model


def test_round_trip_with_metadata(tmp_path):
    t = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    save_tensors(tmp_path / "ck", t, {"note": "hi"})
    back, meta = load_tensors(tmp_path / "ck")
    assert meta["note"] == "hi" and len(meta["sha256"]) == 64
    assert torch.equal(back["a"], t["a"]) and torch.equal(back["b"], t["b"])


def test_corruption_is_detected(tmp_path):
    save_tensors(tmp_path / "ck", {"a": torch.zeros(100)})
    path = tmp_path / "ck.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="do not match the SHA-256"):
        load_tensors(tmp_path / "ck")


def test_no_temporary_files_left_behind(tmp_path):
    save_tensors(tmp_path / "ck", {"a": torch.zeros(2)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.json", "ck.safetensors"]


def test_loading_into_the_wrong_model_is_a_clear_error(tmp_path):
    save_model(tmp_path / "m", torch.nn.Linear(3, 4))
    with pytest.raises(CheckpointError, match="do not match the model"):
        load_model(tmp_path / "m", torch.nn.Linear(5, 4, bias=False))


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_tensors(tmp_path / "nothing")


def test_extra_state_round_trips_without_pickle(tmp_path):
    class Scheduled(torch.nn.Linear):
        progress = 0.0

        def get_extra_state(self):
            return {"progress": self.progress}

        def set_extra_state(self, state):
            self.progress = state["progress"]

    m = Scheduled(2, 2)
    m.progress = 0.75
    save_model(tmp_path / "m", m)
    fresh = Scheduled(2, 2)
    load_model(tmp_path / "m", fresh)
    assert fresh.progress == 0.75 and torch.equal(fresh.weight, m.weight)


def test_stems_with_dots(tmp_path):
    save_tensors(tmp_path / "slice-w0.25-d2", {"a": torch.ones(1)})
    assert (tmp_path / "slice-w0.25-d2.safetensors").exists() and (tmp_path / "slice-w0.25-d2.json").exists()
    back, _ = load_tensors(tmp_path / "slice-w0.25-d2")
    assert torch.equal(back["a"], torch.ones(1))


def _interrupt_at(monkeypatch, n_replace: int):
    """Make the ``n_replace``-th ``os.replace`` inside save_tensors raise KeyboardInterrupt."""
    import brickwork.persist as persist

    calls = {"n": 0}
    real = persist.os.replace

    def replace(src, dst):
        calls["n"] += 1
        if calls["n"] == n_replace:
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(persist.os, "replace", replace)


@pytest.mark.parametrize("cut_at, expect", [(1, "old"), (2, "old"), (3, "new")])
def test_an_interrupted_save_leaves_the_old_or_the_new_checkpoint(tmp_path, monkeypatch, cut_at, expect):
    # save_tensors renames three times: tensors -> pending, JSON into place (the commit
    # point), pending -> tensors. A Ctrl-C at any of them must not pair new tensors with old
    # metadata (which is what a resumed run tripped over before this was a two-phase commit).
    old, new = {"a": torch.zeros(4)}, {"a": torch.ones(4)}
    save_tensors(tmp_path / "ck", old, {"step": 1})
    with monkeypatch.context() as m:
        _interrupt_at(m, cut_at)
        with pytest.raises(KeyboardInterrupt):
            save_tensors(tmp_path / "ck", new, {"step": 2})
    back, meta = load_tensors(tmp_path / "ck")
    want, step = (old, 1) if expect == "old" else (new, 2)
    assert torch.equal(back["a"], want["a"]) and meta["step"] == step
    save_tensors(tmp_path / "ck", new, {"step": 3})  # a later save cleans up after the cut one
    assert {p.name for p in tmp_path.iterdir()} == {"ck.json", "ck.safetensors"}
