"""Chains of layers: the skip-nothing chain is the model, an identity layer is found skippable by
the search, scores zero importance, and dropping it changes nothing."""

import pytest
import torch

from brickwork.models import mlp, vit
from brickwork.ops.chain import (
    ChainModel,
    beam_search_chain,
    chain_correct,
    drop_attention,
    drop_layers,
    enumerate_chains,
    layer_importance,
    least_important,
    per_sample_oracle,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def model_and_data():
    torch.manual_seed(0)
    m = vit((1, 8, 8), 4, dim=16, depth=4, heads=2, patch=4)
    with torch.no_grad():  # layer 1 becomes the identity, layer 2 loses its attention
        m.body.layers[1].attn.out.weight.zero_()
        m.body.layers[1].attn.out.bias.zero_()
        m.body.layers[1].ffn.down.weight.zero_()
        m.body.layers[1].ffn.down.bias.zero_()
        m.body.layers[2].attn.out.weight.zero_()
        m.body.layers[2].attn.out.bias.zero_()
    m.eval()
    x = torch.randn(48, 1, 8, 8)
    with torch.no_grad():
        y = m(x).argmax(-1)  # labels the full model gets right
    return m, x, y


def test_full_chain_is_the_model(model_and_data):
    m, x, _ = model_and_data
    torch.testing.assert_close(ChainModel(m, range(4))(x), m(x))
    torch.testing.assert_close(ChainModel(m, [0, 2, 3])(x), m(x))  # skipping the identity layer


def test_beam_search_skips_the_identity_layer(model_and_data):
    m, x, y = model_and_data
    costs = [1.0, 1.0, 1.0, 1.0]
    best, explored = beam_search_chain(m, x, y, min_accuracy=1.0, costs=costs, beam=3)
    assert best.accuracy == 1.0 and best.cost <= 3 and 1 not in best.chain
    assert any(r.chain == (0, 1, 2, 3) and r.accuracy == 1.0 for r in explored)
    assert len({r.chain for r in explored}) == len(explored)


def test_per_sample_oracle_is_never_worse_than_the_full_chain(model_and_data):
    m, x, y = model_and_data
    cands = enumerate_chains(4, max_repeat=1)
    assert len(cands) == 2**4 - 1
    oracle = per_sample_oracle(m, x, y, cands)
    assert (oracle.oracle_correct >= oracle.full_correct).all()
    assert (oracle.relative_cost <= 0.75).all()  # every sample can at least skip the identity layer
    for i in range(0, 48, 7):
        assert chain_correct(m, oracle.best[i], x[i : i + 1], y[i : i + 1]).item() == oracle.oracle_correct[i]
        assert chain_correct(m, oracle.cheapest[i], x[i : i + 1], y[i : i + 1]).item() >= oracle.full_correct[i]
        assert len(oracle.cheapest[i]) == 4 * oracle.relative_cost[i]


def test_importance_and_dropping(model_and_data):
    m, x, _ = model_and_data
    blocks = layer_importance(m, [x[:24], x[24:]], "block")
    attention = layer_importance(m, [x], "attention")
    assert blocks[1] == pytest.approx(0.0, abs=1e-6) and min(blocks[i] for i in (0, 2, 3)) > 1e-4
    assert attention[1] == pytest.approx(0.0, abs=1e-6) and attention[2] == pytest.approx(0.0, abs=1e-6)
    assert least_important(blocks, 1) == [1]
    with torch.no_grad():
        torch.testing.assert_close(drop_layers(m, [1])(x), m(x))
        torch.testing.assert_close(drop_attention(m, [1, 2])(x), m(x))
        assert not torch.allclose(drop_layers(m, [0])(x), m(x))
    assert len(drop_layers(m, [1]).body) == 3 and len(m.body) == 4  # a copy


def test_importance_of_shape_changing_layers_is_nan_and_attention_needs_attention():
    m = mlp((1, 8, 8), 3, width=8, depth=2)
    assert all(s == s for s in layer_importance(m, [torch.randn(4, 1, 8, 8)]))
    assert all(s != s for s in layer_importance(m, [torch.randn(4, 1, 8, 8)], "attention"))
    with pytest.raises(ValueError, match="no attention"):
        drop_attention(m, [0])


def test_post_norm_blocks_score_and_drop_their_whole_attention_sublayer():
    from brickwork.nn import ClassifierHead, FeedForward, PostNormBlock, Stack, StackModel
    from brickwork.nn.attention import MultiHeadAttention

    torch.manual_seed(0)
    blocks = [PostNormBlock(8, MultiHeadAttention(8, 2), FeedForward(8, 16)) for _ in range(2)]
    m = StackModel(torch.nn.Identity(), Stack(blocks), ClassifierHead(8, 3)).eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        after = blocks[0].norm1(x + blocks[0].attn(x))
        cos = torch.nn.functional.cosine_similarity(x.flatten(0, 1), after.flatten(0, 1), dim=-1)
        # Post-norm: the sublayer is norm1(h + attn(h)), not the pre-norm h + attn(norm1(h)).
        assert layer_importance(m, [x], "attention")[0] == pytest.approx(float((1 - cos).mean()), abs=1e-6)
        dropped = drop_attention(m, [0])
        b = blocks[0]
        torch.testing.assert_close(dropped.body.layers[0](x), b.norm2(x + b.ffn(x)))  # attention and its norm gone
    assert isinstance(blocks[0].norm1, torch.nn.LayerNorm)  # the original is untouched


def test_importance_weighs_batches_by_their_vectors():
    torch.manual_seed(0)
    m = mlp((1, 8, 8), 3, width=8, depth=2)
    x = torch.randn(10, 1, 8, 8)
    whole, split = layer_importance(m, [x]), layer_importance(m, [x[:1], x[1:]])
    assert whole == pytest.approx(split, abs=1e-6)  # a 1-sample batch does not count as much as 9
