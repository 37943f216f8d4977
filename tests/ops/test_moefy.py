"""MoEfication invariants: top-k = E is the dense FFN, partitions are balanced disjoint covers, the
output bias is added once, the conversion is a reversible copy, and unchosen experts cost nothing."""

import pytest
import torch
from torch import nn

from brickwork.analysis.clustering import (
    check_partition,
    coactivation_partition,
    kmeans_partition,
)
from brickwork.analysis.embedding_eval import module_flops
from brickwork.nn import FeedForward, MultiHeadAttention, PostNormBlock, Stack, StackModel
from brickwork.nn.moe import MoE
from brickwork.nn.routing import MLPRouter
from brickwork.ops.moefy import NeuronExperts, dense_ffn, moefy, moefy_like, set_top_k
from brickwork.train.checkpoint import load_model, save_model

D, H = 16, 64


def tiny_model(layers: int = 2) -> StackModel:
    blocks = [PostNormBlock(D, MultiHeadAttention(D, 2), FeedForward(D, H, act="gelu")) for _ in range(layers)]
    model = StackModel(nn.Identity(), Stack(blocks), nn.Identity())
    with torch.no_grad():  # non-zero biases, so that mishandling them shows
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.bias.normal_(0, 0.5)
    return model.eval()


def calib() -> list[torch.Tensor]:
    return list(torch.randn(8, 12, D).split(4))


@pytest.mark.parametrize("clustering,router", [("kmeans", "emoe"), ("coactivation", "mlp"), ("random", "emoe")])
def test_top_k_equal_to_experts_reproduces_the_dense_model(clustering, router):
    model = tiny_model()
    conv, _ = moefy(model, calib(), num_experts=8, top_k=8, clustering=clustering, router=router, router_epochs=2)
    x = torch.randn(3, 7, D)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), model(x), atol=1e-5, rtol=1e-5)
        set_top_k(conv, 2)
        assert (conv(x) - model(x)).abs().max() > 1e-3  # fewer experts: a different function


def test_down_bias_is_added_once_per_token():
    ffn = FeedForward(D, H)
    with torch.no_grad():
        ffn.down.bias.normal_(0, 1.0)
    model = tiny_model(1)
    model.body.layers[0].ffn = ffn
    conv, _ = moefy(model, None, num_experts=4, top_k=2, clustering="kmeans")
    moe = conv.body.layers[0].ffn
    x = torch.randn(5, D)
    with torch.no_grad():
        out = moe(x)
        rec = moe.record
        bank = moe.experts
        expected = ffn.down.bias.expand(5, D).clone()
        for t, e in zip(rec.token_idx.tolist(), rec.expert_idx.tolist(), strict=True):
            idx = bank.neurons[e]
            h = ffn.act(x[t] @ ffn.up.weight[idx].t() + ffn.up.bias[idx])
            expected[t] += h @ ffn.down.weight[:, idx].t()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert not any(n.endswith("b_out") for n, _ in moe.named_parameters())  # no per-expert output bias


def test_partitions_are_balanced_disjoint_covers():
    w_up = torch.randn(H, D)
    fired = torch.randn(200, H) > 0.5
    for part in (kmeans_partition(w_up, 8), coactivation_partition(fired, 8)):
        assert part.shape == (8, H // 8)
        check_partition(part, H)  # raises unless every neuron is in exactly one expert
    with pytest.raises(ValueError, match="disjoint cover"):
        check_partition(torch.zeros(8, H // 8, dtype=torch.long), H)


def test_moefy_copies_and_dense_ffn_inverts_exactly():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    conv, _ = moefy(model, None, num_experts=4, top_k=1, clustering="kmeans")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # original untouched
    assert isinstance(model.body.layers[0].ffn, FeedForward) and isinstance(conv.body.layers[0].ffn, MoE)
    back = dense_ffn(conv.body.layers[1].ffn)
    orig = model.body.layers[1].ffn
    for a, b in ((back.up, orig.up), (back.down, orig.down)):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert sum(p.numel() for p in conv.parameters()) == sum(p.numel() for p in model.parameters())  # emoe: no new


def test_unchosen_experts_cost_nothing():
    model = tiny_model()
    x = [torch.randn(4, 10, D)]
    dense = module_flops(model, x)["ffn_flops"]
    conv, _ = moefy(model, None, num_experts=8, top_k=2)
    router = 2 * D * 8 * 10 * 2  # x @ keys^T: 2 D E FLOPs per token, 10 tokens per sample, 2 layers
    assert module_flops(conv, x)["ffn_flops"] == pytest.approx(dense * 2 / 8 + router)


def test_mlp_router_is_trained_and_saved_conversions_reload(tmp_path):
    model = tiny_model()
    conv, stats = moefy(model, calib(), num_experts=4, top_k=1, clustering="kmeans", router="mlp", router_epochs=3)
    assert set(stats) == {0, 1}  # one fit per converted layer (the fit itself: test_moefy_router.py)
    assert isinstance(conv.body.layers[0].ffn.router, MLPRouter)
    save_model(tmp_path / "m", conv)
    again = moefy_like(model, 4, 1, "mlp")
    load_model(tmp_path / "m", again)
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        torch.testing.assert_close(again(x), conv(x), atol=0, rtol=0)
    assert isinstance(again.body.layers[0].ffn.experts, NeuronExperts)


def test_bad_arguments():
    model = tiny_model()
    with pytest.raises(ValueError, match="equal experts"):
        moefy(model, None, num_experts=7, top_k=1)
    with pytest.raises(ValueError, match="top_k"):
        moefy(model, None, num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="calibration"):
        moefy(model, None, num_experts=4, top_k=1, clustering="coactivation")
    glu = tiny_model(1)
    glu.body.layers[0].ffn = FeedForward(D, H, glu=True)
    with pytest.raises(ValueError, match="GLU"):
        moefy(glu, None, num_experts=4, top_k=1)
