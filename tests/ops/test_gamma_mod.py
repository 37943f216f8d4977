"""gamma-MoD: the lowest-ARank layers are the ones converted, and capacity 1.0 is the dense model."""

import torch

from brickwork.analysis.arank import attention_ranks
from brickwork.experiment.build import apply_structure
from brickwork.models import vit
from brickwork.nn.mod import MixtureOfDepths
from brickwork.ops.gamma_mod import body_aranks, choose_layers, gamma_mod


def tiny_vit(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return vit((1, 8, 8), 5, dim=16, depth=4, heads=2, patch=2).double()


def test_the_chosen_layers_are_exactly_the_lowest_arank_ones():
    model, x = tiny_vit(0), torch.randn(6, 1, 8, 8, dtype=torch.float64)
    d = 16
    with torch.no_grad():  # zero queries in layers 1 and 3: uniform attention, rank-1 maps
        for i in (1, 3):
            model.body.layers[i].attn.qkv.weight[:d].zero_()
            if model.body.layers[i].attn.qkv.bias is not None:
                model.body.layers[i].attn.qkv.bias[:d].zero_()
    ranks = body_aranks(model, x)
    per_path = attention_ranks(model, x)
    assert ranks == [per_path[f"body.layers.{i}.attn"] for i in range(4)]  # one attention per block
    assert ranks[1] == ranks[3] == 1.0 and min(ranks[0], ranks[2]) > 1.0
    chosen = choose_layers(ranks, 2, "arank")
    assert chosen == [1, 3] and choose_layers(ranks, 1, "arank") == [3]  # a tie: the deeper layer
    assert choose_layers(ranks, 2, "last") == [2, 3] and choose_layers(ranks, 2, "all") == [0, 1, 2, 3]
    converted, recipe = gamma_mod(model, chosen, 0.5)
    wrapped = [i for i, layer in enumerate(converted.body.layers) if isinstance(layer, MixtureOfDepths)]
    assert wrapped == chosen == recipe["layers"]
    assert not any(isinstance(layer, MixtureOfDepths) for layer in model.body.layers)  # a copy


def test_at_capacity_one_the_converted_model_is_the_dense_one_and_the_recipe_replays():
    model, x = tiny_vit(1), torch.randn(5, 1, 8, 8, dtype=torch.float64)
    converted, recipe = gamma_mod(model, [0, 2, 3], 1.0)
    model.eval(), converted.eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=0, atol=1e-10)
        fresh = apply_structure(tiny_vit(2), [recipe])  # structure rebuilt, then the weights
        fresh.load_state_dict(converted.state_dict())
        torch.testing.assert_close(fresh.eval()(x), converted(x), rtol=0, atol=0)
        half, _ = gamma_mod(model, [0, 2, 3], 0.5)
        assert (half.eval()(x) - model(x)).abs().max() > 1e-6  # below capacity 1 tokens do skip
