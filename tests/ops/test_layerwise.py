"""Layer-wise growth edits: new layers on top, LoRA over a frozen stack (exact at the start), what a
phase trains, the training FLOPs of a phase against hand counts, and replaying the recipe."""

import pytest
import torch

from brickwork.errors import BrickworkError
from brickwork.models import mlp, transformer_lm
from brickwork.nn.adapters import LoRALinear
from brickwork.ops.layerwise import add_lora, append_layer, grow_layers_like, linear_paths, set_trainable_
from brickwork.train.budget import step_flops
from brickwork.train.losses import build_loss


def _random_models(seed: int):
    g = torch.Generator().manual_seed(seed)
    w, d = (int(v) for v in torch.randint(3, 9, (2,), generator=g))
    torch.manual_seed(seed)
    yield mlp(in_shape=(1, 4, 4), num_classes=5, width=w, depth=d % 3 + 1).double(), torch.randn(6, 1, 4, 4).double()
    lm = transformer_lm(in_shape=(7,), num_classes=11, dim=4 * (w % 3 + 1), depth=d % 2 + 1, heads=2).double()
    yield lm, torch.randint(0, 11, (3, 7))


@pytest.mark.parametrize("seed", range(3))
def test_lora_over_the_stack_is_bit_exact_until_trained_and_then_equals_the_merged_layer(seed):
    for model, x in _random_models(seed):
        model.eval()
        paths = linear_paths(model, ["body.*"])
        wrapped = add_lora(model, paths, rank=2, alpha=3.0)
        assert all(isinstance(wrapped.get_submodule(p), LoRALinear) for p in paths)
        assert all(type(model.get_submodule(p)) is torch.nn.Linear for p in paths)  # a copy: model untouched
        assert torch.equal(wrapped(x), model(x))  # B = 0: the update is an exact zero
        for p in paths:
            lora = wrapped.get_submodule(p)
            torch.nn.init.normal_(lora.lora_b)
            h = torch.randn(4, lora.in_features, dtype=torch.float64)
            assert torch.allclose(lora(h), lora.merged()(h), rtol=0, atol=1e-10)
        assert not torch.allclose(wrapped(x), model(x))


@pytest.mark.parametrize("seed", range(3))
def test_append_layer_keeps_the_stack_below_and_draws_a_fresh_seeded_layer(seed):
    for model, x in _random_models(seed):
        top = model.body.layers[-1]
        grown = append_layer(model, seed=seed)
        again = append_layer(model, seed=seed)
        assert len(grown.body) == len(model.body) + 1 and len(model.body) == len(again.body) - 1
        for a, b in zip(model.body.layers, grown.body.layers[:-1], strict=True):
            assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
        new = list(grown.body.layers[-1].named_parameters())
        assert all(
            torch.equal(p, q) for (_, p), (_, q) in zip(new, again.body.layers[-1].named_parameters(), strict=True)
        )
        weights = [(n, p) for n, p in new if n.endswith("weight") and p.dim() == 2]
        assert weights and all(not torch.equal(p, top.get_parameter(n)) for n, p in weights)
        copied = append_layer(model, init="copy")
        assert all(
            torch.equal(p, q) for p, q in zip(top.parameters(), copied.body.layers[-1].parameters(), strict=True)
        )
        assert grown(x).shape == model(x).shape


@pytest.mark.parametrize("seed", range(3))
def test_an_identity_start_keeps_the_function_of_the_shallower_model(seed):
    model, x = list(_random_models(seed))[1]  # the transformer LM: residual blocks
    grown = append_layer(model, init="identity", seed=seed)
    assert torch.equal(grown.eval()(x), model.eval()(x))
    new, top = grown.body.layers[-1], model.body.layers[-1]
    assert not torch.equal(new.attn.qkv.weight, top.attn.qkv.weight)  # re-drawn, then only the outputs zeroed
    assert not new.attn.out.weight.any() and not new.ffn.down.weight.any()


def test_set_trainable_freezes_all_else_and_refuses_a_phase_that_trains_nothing():
    model = mlp(in_shape=(1, 4, 4), num_classes=5, width=6, depth=2)
    n = set_trainable_(model, ["body.layers.1.*", "head.*"])
    assert n == (6 * 6 + 6) + (6 * 5 + 5)  # layer 1 and the head
    trained = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trained == {"body.layers.1.linear.weight", "body.layers.1.linear.bias", "head.proj.weight", "head.proj.bias"}
    with pytest.raises(BrickworkError, match="nothing would train"):
        set_trainable_(model, ["nope.*"])


def test_training_flops_of_a_phase_match_hand_counts():
    """A frozen stack costs its forward pass only; the backward pass starts at the lowest trainable layer."""
    torch.manual_seed(0)
    w, d, k, i, b = 6, 3, 5, 16, 4
    model = mlp(in_shape=(1, 4, 4), num_classes=k, width=w, depth=d)
    x, y = torch.randn(b, 1, 4, 4), torch.randint(0, k, (b,))
    loss = build_loss("cross_entropy")
    fwd = 2 * b * (i * w + d * w * w + w * k)
    set_trainable_(model, ["head.*"])  # weight gradient of the head only
    assert step_flops(model, x, y, loss) == fwd + 2 * b * w * k
    set_trainable_(model, ["body.layers.2.*", "head.*"])  # + the head's input gradient, layer 2's weights
    assert step_flops(model, x, y, loss) == fwd + 2 * b * w * k + 2 * b * w * k + 2 * b * w * w
    set_trainable_(model, ["*"])  # everything: 3x forward minus the input gradient of the stem
    assert step_flops(model, x, y, loss) == 3 * fwd - 2 * b * i * w
    assert all(p.grad is None for p in model.parameters())  # the measurement leaves no gradient


def test_grow_layers_recipe_replays_the_structure():
    model = transformer_lm(in_shape=(7,), num_classes=11, dim=8, depth=1, heads=2)
    grown = append_layer(append_layer(model, seed=1), seed=2)
    paths = linear_paths(grown, ["body.layers.0.*", "body.layers.1.*"])
    grown = add_lora(grown, paths, rank=2)
    recipe = {"op": "grow_layers", "added": 2, "lora_rank": 2, "lora_alpha": 1.0, "lora_paths": paths}
    replayed = grow_layers_like(transformer_lm(in_shape=(7,), num_classes=11, dim=8, depth=1, heads=2), recipe)
    assert {k: v.shape for k, v in replayed.state_dict().items()} == {k: v.shape for k, v in grown.state_dict().items()}
