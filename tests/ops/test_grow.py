"""Growth preserves the function: every operation on randomly generated brick models, in float64.

Each test loops over seeded random sizes (not one hand-picked case) and compares the grown
model with the original on random inputs: within 1e-10 for Net2Net splits (a division), and
bit-exact where the new weights start at zero and the summation is otherwise unchanged.
"""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from brickwork.errors import BrickworkError
from brickwork.models import cnn, mlp, moe_lm, moe_mlp, nested_lm, nested_mlp, sparse_mlp, transformer_lm, vit
from brickwork.nn import StackModel
from brickwork.nn.moe import MoE
from brickwork.nn.routing import MoESettings
from brickwork.ops.grow import (
    add_experts,
    add_heads,
    chosen_new,
    deepen,
    reproduce_dense_,
    residual_ffn_block,
    split_expert,
    upcycle,
    widen_ffn,
    widen_layers,
    widen_residual,
)

TOL = 1e-10
CASES = 4  # random models per family and test


def _prep(model: nn.Module, seed: int) -> nn.Module:
    """float64, eval mode, every bias and norm affine non-trivial (so mishandling them shows)."""
    model = model.double().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or p.dim() == 1:
                p.copy_(
                    torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3
                    + (1.0 if "norm" in name and name.endswith("weight") else 0.0)
                )
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
    return model


def random_model(family: str, seed: int) -> tuple[nn.Module, torch.Tensor]:
    """A random tiny model of ``family`` and a random input batch for it."""
    r = random.Random(seed)
    torch.manual_seed(seed)
    if family == "mlp":
        m = mlp(
            (r.randint(3, 9),),
            r.randint(2, 5),
            width=r.randint(3, 12),
            depth=r.randint(1, 3),
            act=r.choice(["gelu", "relu", "tanh"]),
        )
        x = torch.randn(5, m.stem.proj.in_features)
    elif family == "cnn":
        chans = tuple(r.randint(2, 6) for _ in range(r.randint(1, 3)))
        m = cnn(
            (r.randint(1, 3), 8, 8),
            r.randint(2, 4),
            channels=chans,
            blocks=r.randint(1, 2),
            norm=r.choice(["batch", "none"]),
        )
        x = torch.randn(3, m.stem.conv.in_channels, 8, 8)
    elif family == "sparse":
        groups = r.choice([2, 4])
        m = sparse_mlp(
            (8,), 3, width=groups * r.randint(1, 3), depth=r.randint(1, 3), groups=groups, in_groups=2, density=0.5
        )
        x = torch.randn(5, 8)
    elif family == "nested":
        m = nested_mlp((6,), 3, width=r.randint(4, 10), depth=r.randint(1, 3))
        x = torch.randn(5, 6)
    elif family == "nested_lm":
        m = nested_lm((5,), 7, dim=4, depth=r.randint(1, 2), heads=2, ffn_hidden=r.randint(3, 9))
        x = torch.randint(0, 7, (3, 5))
    elif family == "lm":
        heads = r.choice([1, 2])
        m = transformer_lm(
            (6,),
            r.randint(5, 11),
            dim=heads * r.randint(2, 4),
            depth=r.randint(1, 3),
            heads=heads,
            mlp_ratio=r.randint(1, 3),
        )
        x = torch.randint(0, m.stem.tok.num_embeddings, (3, 6))
    elif family == "vit":
        heads = r.choice([1, 2])
        m = vit(
            (1, 8, 8),
            3,
            dim=heads * r.randint(2, 4),
            depth=r.randint(1, 2),
            heads=heads,
            patch=4,
            mlp_ratio=r.randint(1, 2),
        )
        x = torch.randn(3, 1, 8, 8)
    elif family == "moe_mlp":
        m = moe_mlp(
            (6,), 3, width=r.randint(3, 8), depth=r.randint(1, 2), hidden=r.randint(2, 6), num_experts=r.randint(2, 4)
        )
        x = torch.randn(5, 6)
    elif family == "moe_lm":
        m = moe_lm((5,), 7, dim=4, depth=r.randint(1, 2), heads=2, hidden=r.randint(2, 6), num_experts=r.randint(2, 4))
        x = torch.randint(0, 7, (3, 5))
    else:
        raise AssertionError(family)
    model = _prep(m, seed)
    return model, x.double() if x.is_floating_point() else x


def _gap(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a(x) - b(x)).abs().max())


def _same(a: nn.Module, b: nn.Module, x: torch.Tensor) -> bool:
    with torch.no_grad():
        return torch.equal(a(x), b(x))


# ---------------------------------------------------------------- width


@pytest.mark.parametrize("family", ["mlp", "cnn", "sparse", "nested"])
@pytest.mark.parametrize("mode", ["split", "zero"])
def test_widening_every_representation_preserves_the_function(family, mode):
    for seed in range(CASES):
        model, x = random_model(family, seed)
        pieces = [model.stem, *model.body.layers]
        positions = list(range(len(pieces)))
        r = random.Random(100 + seed)
        chosen = sorted(r.sample(positions, r.randint(1, len(positions))))
        widest = max(_out(pieces[k]) for k in chosen)
        width = widest + r.randint(1, 6)
        if family == "sparse":  # group-connected layers grow by whole groups
            step = _lcm_blocks(model)
            width = _round_up(widest + 1, step) + step * r.randint(0, 2)
        grown = widen_layers(model, width, chosen, mode=mode, seed=seed)
        assert all(_out(p) == width for k, p in enumerate([grown.stem, *grown.body.layers]) if k in chosen)
        assert _gap(model, grown, x) < TOL, (family, mode, seed, chosen, width)
        if mode == "zero" and family != "sparse":
            assert _gap(model, grown, x) < 1e-12


def _out(piece: nn.Module) -> int:
    from brickwork.ops.grow.width import out_width

    return out_width(piece)


def _lcm_blocks(model: nn.Module) -> int:
    import math

    from brickwork.nn.sparse import GroupLinear

    sizes = [m.block_out for m in model.modules() if isinstance(m, GroupLinear)]
    sizes += [m.block_in for m in model.modules() if isinstance(m, GroupLinear)]
    return math.lcm(*sizes)


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def test_widening_copies_and_the_original_is_unchanged():
    model, x = random_model("mlp", 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grown = widen_layers(model, 40)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert grown.body.layers[0].linear.weight.shape == (40, 40)
    assert widen_layers(model, 40, in_place=True) is model


def test_split_units_are_copies_and_zero_units_have_zero_outgoing_weights():
    model, _ = random_model("mlp", 1)
    old = model.body.layers[0].linear.out_features
    split = widen_layers(model, old + 3, [1], mode="split", seed=3)
    w = split.body.layers[0].linear.weight
    assert any(torch.equal(w[j], w[i]) for j in range(old, old + 3) for i in range(old))
    zero = widen_layers(model, old + 3, [1], mode="zero", seed=3)
    nxt = zero.body.layers[1].linear if len(zero.body) > 1 else zero.head.proj
    assert torch.equal(nxt.weight[:, old:], torch.zeros_like(nxt.weight[:, old:]))
    assert not torch.equal(zero.body.layers[0].linear.weight[old:], torch.zeros(3, w.shape[1], dtype=w.dtype))


@pytest.mark.parametrize("family", ["lm", "vit", "nested_lm"])
@pytest.mark.parametrize("mode", ["split", "zero"])
def test_widening_ffn_hidden_preserves_the_function(family, mode):
    for seed in range(CASES):
        model, x = random_model(family, seed)
        hidden = model.body.layers[0].ffn.up.out_features + random.Random(seed).randint(1, 9)
        grown = widen_ffn(model, hidden, mode=mode, seed=seed)
        assert grown.body.layers[-1].ffn.down.in_features == hidden
        assert _gap(model, grown, x) < TOL


def test_widening_a_glu_ffn_moves_up_and_gate_together():
    from brickwork.nn import FeedForward, ResidualFFN, Stack

    for seed in range(CASES):
        torch.manual_seed(seed)
        ffn = FeedForward(5, 4 + seed, act="silu", glu=True)
        model = _prep(StackModel(nn.Identity(), Stack([ResidualFFN(5, ffn)]), nn.Identity()), seed)
        x = torch.randn(6, 5, dtype=torch.float64)
        grown = widen_ffn(model, 11 + seed, seed=seed)
        assert _gap(model, grown, x) < TOL


def test_growing_to_a_smaller_or_equal_size_is_one_clear_error():
    model, _ = random_model("mlp", 2)
    w = model.body.layers[0].linear.out_features
    with pytest.raises(
        BrickworkError, match=rf"stem.proj \(output\) has {w} units; growing needs more than {w}, got {w}"
    ):
        widen_layers(model, w, [0])
    with pytest.raises(BrickworkError, match="position 9 is out of range"):
        widen_layers(model, w + 1, [9])
    lm, _ = random_model("lm", 0)
    h = lm.body.layers[0].ffn.up.out_features
    with pytest.raises(BrickworkError, match=rf"body.layers.0.ffn \(hidden\) has {h} units"):
        widen_ffn(lm, h - 1)


def test_widening_refuses_what_is_not_exact():
    from brickwork.nn import ClassifierHead, DenseLayer, FlattenEmbed, Stack

    normed = StackModel(FlattenEmbed(4, 5), Stack([DenseLayer(5, 5)]), ClassifierHead(5, 2, norm=True))
    with pytest.raises(BrickworkError, match=r"head normalises over its input width \(LayerNorm\)"):
        widen_layers(normed, 9, [1])
    vit_model, _ = random_model("vit", 0)
    with pytest.raises(BrickworkError, match="TransformerBlock"):
        widen_layers(vit_model, 99, [1])
    g = cnn((1, 8, 8), 3, channels=(4,), norm="group")
    with pytest.raises(BrickworkError, match="GroupNorm"):
        widen_layers(g, 9, [0])
    sp, _ = random_model("sparse", 0)
    with pytest.raises(BrickworkError, match="multiple of"):
        widen_layers(sp, sp.body.layers[0].linear.d_out + 1, [1])


# ---------------------------------------------------------------- depth


@pytest.mark.parametrize("family", ["lm", "vit", "moe_mlp", "moe_lm", "cnn"])
def test_inserting_an_identity_block_anywhere_preserves_the_function(family):
    for seed in range(CASES):
        model, x = random_model(family, seed)
        if family == "cnn":  # an identity conv block needs equal channels and stride 1: copy such a block
            r = random.Random(seed)
            chans = tuple(r.randint(2, 5) for _ in range(r.randint(1, 2)))
            model = _prep(cnn((2, 8, 8), 3, channels=chans, blocks=2, norm=["batch", "none"][seed % 2]), seed)
            x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
            like = r.choice([i for i, b in enumerate(model.body.layers) if b.conv.stride == (1, 1)])
            pos = r.choice([like, like + 1])
        else:
            like, pos = None, random.Random(seed).randint(0, len(model.body))
        grown = deepen(model, pos, like=like)
        assert len(grown.body) == len(model.body) + 1
        assert _same(model, grown, x) or _gap(model, grown, x) < TOL
        if family != "cnn":  # zero output projections: the block adds exact zeros
            assert _same(model, grown, x), (family, seed, pos)


def test_a_residual_ffn_block_deepens_any_mlp_exactly():
    for seed in range(CASES):
        model, x = random_model("mlp", seed)
        dim = model.body.layers[0].linear.out_features
        block = residual_ffn_block(dim, 2 * dim, like=model)
        for pos in range(len(model.body) + 1):
            assert _same(model, deepen(model, pos, block=block), x)


def test_identity_dense_layer_needs_an_idempotent_activation():
    relu = _prep(mlp((4,), 2, width=5, depth=2, act="relu"), 0)
    x = torch.randn(6, 4, dtype=torch.float64)
    grown = deepen(relu, 2)  # after a ReLU layer
    assert _same(relu, grown, x) or _gap(relu, grown, x) < TOL
    gelu = mlp((4,), 2, width=5, depth=2, act="gelu")
    with pytest.raises(BrickworkError, match="residual_ffn"):
        deepen(gelu, 1)
    with pytest.raises(BrickworkError, match="stem does not end in a ReLU"):
        deepen(relu, 0)  # the MLP stem is GELU: relu(gelu(x)) is not gelu(x)


def test_depth_bad_input():
    model, _ = random_model("lm", 0)
    n = len(model.body)
    with pytest.raises(BrickworkError, match=f"position {n + 2} is out of range"):
        deepen(model, n + 2)
    with pytest.raises(BrickworkError, match="like=7 is out of range"):
        deepen(model, 0, like=7)


def test_deepening_copies_and_keeps_a_shared_padding_mask_shared():
    from brickwork.models.minilm import bert_encoder
    from brickwork.nn import TransformerBlock

    enc = bert_encoder(vocab_size=20, dim=8, depth=2, heads=2, hidden=16, max_len=10)
    with pytest.raises(BrickworkError, match="post-norm"):
        deepen(enc, 1)
    # a pre-norm block built around the encoder's attention shares its padding holder
    attn = enc.body.layers[0].attn
    from brickwork.nn import FeedForward

    block = TransformerBlock(8, attn, FeedForward(8, 16))
    enc.body.layers[1] = block
    grown = deepen(enc, 2, like=1)
    assert grown.body.layers[2].attn._padding[0] is grown.stem.padding
    assert enc.body.layers[1] is block and len(enc.body) == 2


# ---------------------------------------------------------------- residual width


@pytest.mark.parametrize("family", ["lm", "vit", "moe_mlp", "moe_lm", "nested_lm"])
def test_widening_the_residual_stream_preserves_the_function(family):
    for seed in range(CASES):
        model, x = random_model(family, seed)
        factor = random.Random(seed).randint(2, 3)
        grown = widen_residual(model, factor)
        assert grown.head.proj.in_features == factor * model.head.proj.in_features
        assert _gap(model, grown, x) < TOL, (family, seed, factor)


def test_residual_width_bad_input():
    model, _ = random_model("lm", 0)
    with pytest.raises(BrickworkError, match="factor must be an integer >= 2"):
        widen_residual(model, 1)
    from brickwork.models.minilm import bert_encoder

    with pytest.raises(BrickworkError, match="BertEmbed"):
        widen_residual(bert_encoder(vocab_size=20, dim=8, depth=1, heads=2, hidden=16, max_len=10), 2)


# ---------------------------------------------------------------- upcycling


@pytest.mark.parametrize("family", ["lm", "vit", "moe_mlp_dense"])
@pytest.mark.parametrize("router", ["topk", "sigmoid"])
def test_upcycled_model_equals_the_dense_one_at_any_router_weights(family, router):
    for seed in range(CASES):
        if family == "moe_mlp_dense":  # the residual MLP with dense FFNs
            r = random.Random(seed)
            model = _prep(moe_mlp((6,), 3, width=r.randint(3, 7), depth=r.randint(1, 2), hidden=4, num_experts=0), seed)
            x = torch.randn(5, 6, dtype=torch.float64)
        else:
            model, x = random_model(family, seed)
        e = random.Random(seed).randint(2, 8)
        k = random.Random(seed + 1).randint(1, e)
        moe = upcycle(model, e, MoESettings(top_k=k, router=router), seed=seed)
        assert all(isinstance(b.ffn, MoE) and b.ffn.num_experts == e for b in moe.body.layers)
        assert _gap(model, moe, x) < TOL, (family, router, seed, e, k)


def test_fine_grained_upcycling_is_exact_when_the_router_spreads_evenly():
    for seed in range(CASES):
        model, x = random_model("lm", seed)
        r = random.Random(seed)
        hidden = model.body.layers[0].ffn.up.out_features
        g = r.choice([d for d in (2, 3, 4) if hidden % d == 0] or [1])
        e = g * r.randint(1, 3)
        k = g * r.randint(1, e // g)
        moe = upcycle(model, e, MoESettings(top_k=k), granularity=g, seed=seed)
        assert moe.body.layers[0].ffn.experts.hidden == hidden // g
        for b in moe.body.layers:
            reproduce_dense_(b.ffn)
        assert _gap(model, moe, x) < TOL, (seed, g, e, k)


def test_upcycling_bad_input_and_copy():
    model, _ = random_model("lm", 0)
    with pytest.raises(BrickworkError, match="top_k must be in"):
        upcycle(model, 2, MoESettings(top_k=3))
    with pytest.raises(BrickworkError, match="not a whole number of copies"):
        upcycle(model, 3, MoESettings(top_k=1), granularity=2)
    with pytest.raises(BrickworkError, match="body layer 5 is out of range"):
        upcycle(model, 2, MoESettings(top_k=1), layers=[5])
    moe = upcycle(model, 2, MoESettings(top_k=1))
    assert not isinstance(model.body.layers[0].ffn, MoE)
    with pytest.raises(BrickworkError, match="not a dense FeedForward"):
        upcycle(moe, 2, MoESettings(top_k=1))


# ---------------------------------------------------------------- heads


@pytest.mark.parametrize("family", ["lm", "vit", "nested_lm", "moe_lm"])
@pytest.mark.parametrize("mode", ["zero", "split"])
def test_added_heads_start_with_no_effect(family, mode):
    for seed in range(CASES):
        model, x = random_model(family, seed)
        attn = model.body.layers[0].attn
        heads = attn.heads + random.Random(seed).randint(1, 3)
        grown = add_heads(model, heads, mode=mode, seed=seed)
        assert all(b.attn.heads == heads for b in grown.body.layers)
        assert _gap(model, grown, x) < TOL, (family, mode, seed)


def test_heads_bad_input():
    model, _ = random_model("lm", 0)
    h = model.body.layers[0].attn.heads
    with pytest.raises(BrickworkError, match=rf"body.layers.0.attn \(heads\) has {h} units; growing needs more"):
        add_heads(model, h)
    mlp_model, _ = random_model("mlp", 0)
    with pytest.raises(BrickworkError, match="not multi-head attention"):
        add_heads(mlp_model, 3)


# ---------------------------------------------------------------- experts


def _moe_models(seed: int) -> tuple[nn.Module, torch.Tensor]:
    return random_model(["moe_mlp", "moe_lm"][seed % 2], seed)


@pytest.mark.parametrize("mode", ["unchosen", "copy"])
def test_added_experts_leave_the_output_unchanged(mode):
    for seed in range(CASES):
        model, x = _moe_models(seed)
        e = model.body.layers[0].ffn.num_experts
        count = e * random.Random(seed).randint(1, 2) if mode == "copy" else random.Random(seed).randint(1, 5)
        grown = add_experts(model, count, mode=mode, seed=seed)
        assert all(b.ffn.num_experts == e + count for b in grown.body.layers)
        assert _gap(model, grown, x) < TOL, (mode, seed)
        if mode == "unchosen":
            assert chosen_new(grown, {f"body.layers.{i}.ffn": e for i in range(len(grown.body))}) == 0


def test_splitting_an_expert_is_exact_with_dense_routing():
    for seed in range(CASES):
        model, x = _moe_models(seed)
        for b in model.body.layers:
            b.ffn.router.top_k = b.ffn.num_experts  # dense routing
        e = model.body.layers[0].ffn.num_experts
        k = random.Random(seed).randrange(e)
        grown = split_expert(model, 0, k)
        assert grown.body.layers[0].ffn.num_experts == e + 1
        assert _gap(model, grown, x) < TOL


def test_expert_bad_input():
    model, _ = _moe_models(0)
    e = model.body.layers[0].ffn.num_experts
    with pytest.raises(BrickworkError, match=f"expert {e} is out of range; body.layers.0.ffn has {e} experts"):
        split_expert(model, 0, e)
    with pytest.raises(BrickworkError, match="copying needs a multiple"):
        add_experts(model, e + 1, mode="copy")
    with pytest.raises(BrickworkError, match="count must be >= 1"):
        add_experts(model, 0)
    dense, _ = random_model("lm", 0)
    with pytest.raises(BrickworkError, match="not a mixture of experts"):
        add_experts(dense, 1)


# ---------------------------------------------------------------- compute of grown models


def test_compute_of_grown_models_matches_hand_counts():
    from brickwork.analysis.compute import measure_compute
    from brickwork.train.budget import step_flops
    from brickwork.train.losses import build_loss

    # multiply-accumulates x 2 per sample; D = 4, H = 8, 6 inputs, 3 classes
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    dense = moe_mlp((6,), 3, width=4, depth=1, hidden=8, num_experts=0)
    flops = lambda m: measure_compute(m, [x]).flops_per_sample  # noqa: E731
    assert flops(dense) == 2 * (6 * 4 + 4 * 8 + 8 * 4 + 4 * 3)
    moe = upcycle(dense, 4, MoESettings(top_k=2))  # router 4 -> 4, two experts per sample
    assert flops(moe) == 2 * (6 * 4 + 4 * 4 + 2 * (4 * 8 + 8 * 4) + 4 * 3)
    # training step: forward + weight gradients everywhere + input gradients above the stem
    fwd = 2 * (6 * 4 + 4 * 4 + 2 * (4 * 8 + 8 * 4) + 4 * 3)
    bwd = 2 * (6 * 4) + 2 * 2 * (4 * 4) + 2 * 2 * 2 * (4 * 8 + 8 * 4) + 2 * 2 * (4 * 3)
    assert step_flops(moe, x, y, build_loss("cross_entropy")) == 16 * (fwd + bwd)
    wide = widen_layers(mlp((6,), 3, width=4, depth=1), 7)
    assert flops(wide) == 2 * (6 * 7 + 7 * 7 + 7 * 3)
    deeper = deepen(wide, 1, block=residual_ffn_block(7, 5))
    assert flops(deeper) == flops(wide) + 2 * (7 * 5 + 5 * 7)
    heads = add_heads(transformer_lm((5,), 7, dim=4, depth=1, heads=2, mlp_ratio=1), 3)
    t = 5  # per sequence: qkv 4 -> 3 * 3 * 2, scores and values 2 * t * t * 2 per head, out 6 -> 4, FFN, head
    want = t * (4 * 18 + 6 * 4 + 2 * 4 * 4 + 4 * 7) + 3 * 2 * t * t * 2
    assert measure_compute(heads, [torch.randint(0, 7, (2, t))]).flops_per_sample == 2 * want


# ---------------------------------------------------------------- recipes


STEPS = [
    ("mlp", {"op": "deepen", "position": 1, "block": "residual_ffn", "hidden": 5}),
    ("lm", {"op": "deepen", "position": 0}),
    ("mlp", {"op": "widen_layers", "width": 13, "mode": "zero"}),
    ("sparse", {"op": "widen_layers", "width": 24, "positions": [1]}),
    ("vit", {"op": "widen_ffn", "hidden": 17}),
    ("lm", {"op": "widen_residual", "factor": 2}),
    ("lm", {"op": "add_heads", "heads": 3}),
    ("moe_lm", {"op": "add_experts", "count": 2}),
    ("moe_mlp", {"op": "add_experts", "count": 4, "mode": "copy", "layers": [0]}),
    ("moe_mlp", {"op": "split_expert", "layer": 0, "expert": 1}),
]


@pytest.mark.parametrize("family,step", STEPS, ids=[f"{f}-{s['op']}" for f, s in STEPS])
def test_a_recorded_step_replays_onto_a_fresh_model_and_takes_the_grown_weights(family, step):
    import json

    from brickwork.ops.grow import GrowSettings, apply_grow, replay_grow

    model, x = random_model(family, 1)
    if family == "moe_mlp" and step["op"] == "add_experts":
        step = {**step, "count": model.body.layers[0].ffn.num_experts}
    s = GrowSettings(**step)
    s.check()
    grown = apply_grow(model, s)
    recipe = json.loads(json.dumps(s.recipe()))  # as saved: plain JSON
    fresh = random_model(family, 1)[0]  # the same builder call: the same skeleton, weights to be replaced
    with torch.no_grad():
        for p in fresh.parameters():
            p.normal_()
    rebuilt = replay_grow(fresh, recipe)
    rebuilt.load_state_dict(grown.state_dict(), strict=True)
    assert _same(grown, rebuilt, x)
