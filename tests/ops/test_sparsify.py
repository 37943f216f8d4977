"""``sparsify``: the function is kept at full connectivity, the input is not modified, units cluster by correlation."""

import pytest
import torch
from torch import nn

from brickwork.models.mlp import mlp
from brickwork.nn import FeedForward
from brickwork.nn.sparse import GroupLinear
from brickwork.ops.sparsify import plan_sparsify, sparsify
from brickwork.registry import REGISTRY

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_full_connectivity_preserves_an_mlp_with_absorbed_permutations():
    model = mlp((1, 8, 8), 10, width=32, depth=2).eval()
    x = torch.randn(128, 1, 8, 8)
    _, choices = plan_sparsify(model, [x], groups=4, density=1.0)
    # Hidden units are regrouped with the permutation absorbed by the next layer; pixels use in_perm.
    assert [c.out_perm is not None for c in choices] == [True, True, True]
    assert not torch.equal(choices[0].in_perm, torch.arange(64))
    new = sparsify(model, [x], groups=4, density=1.0)
    assert sum(isinstance(m, GroupLinear) for m in new.modules()) == 3
    torch.testing.assert_close(new(x), model(x), rtol=1e-5, atol=1e-5)


def test_full_connectivity_preserves_a_block_with_layer_norms():
    # The FFN's hidden units may move (absorbed by `down`); its outputs feed a LayerNorm and may not.
    model = nn.Sequential(nn.LayerNorm(16), FeedForward(16, 32), nn.LayerNorm(16)).eval()
    x = torch.randn(4, 6, 16)
    _, choices = plan_sparsify(model, [x], groups=4, density=1.0, exclude=())
    assert {c.path: c.out_perm is not None for c in choices} == {"1.up": True, "1.down": False}
    torch.testing.assert_close(
        sparsify(model, [x], groups=4, density=1.0, exclude=[])(x), model(x), rtol=1e-5, atol=1e-5
    )


def test_copies_and_keeps_the_heaviest_blocks():
    model = mlp((1, 8, 8), 10, width=32, depth=1).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(64, 1, 8, 8)
    new = sparsify(model, [x], groups=4, density=0.5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    layers = [m for m in new.modules() if isinstance(m, GroupLinear)]
    assert len(layers) == 2 and all(m.density == 0.5 for m in layers)
    assert isinstance(new.head.proj, nn.Linear)  # the classifier stays dense by default
    _, choices = plan_sparsify(model, [x], groups=4, density=0.5, criterion="weight")
    for c in choices:
        assert 0.5 <= c.kept_mass < 1.0  # the two heaviest of four blocks hold at least half the mass


def test_registered_as_an_op():
    assert REGISTRY.get("op", "sparsify").obj is sparsify


def test_correlation_keeps_the_strongly_anticorrelated_input_group():
    """Connectivity follows |corr| (G2GNet): an output group driven by minus an input group is
    connected to it, not to the uncorrelated one; a signed score would pick the wrong group."""
    torch.manual_seed(0)
    n = 256
    a, b = torch.randn(n, 1), torch.randn(n, 1)  # two independent input ensembles
    x = torch.cat([a, a, b, b], 1) + 0.01 * torch.randn(n, 4)
    layer = nn.Linear(4, 4, bias=False)
    with torch.no_grad():  # outputs 0-1 = -(b + b), outputs 2-3 = +0.1 (a + a)
        layer.weight.copy_(torch.tensor([[0, 0, -1, -1], [0, 0, -1, -1], [0.1, 0.1, 0, 0], [0.1, 0.1, 0, 0.0]]))
    model = nn.Sequential(layer)
    _, (choice,) = plan_sparsify(model, [x], groups=2, density=0.5, exclude=())
    assert choice.out_perm is None  # no consumer: the outputs keep their order
    group_of_unit = torch.empty(4, dtype=torch.long)
    group_of_unit[choice.in_perm] = torch.arange(4) // 2  # input group of each original unit
    assert group_of_unit[0] == group_of_unit[1] != group_of_unit[2] == group_of_unit[3]
    expected = torch.stack([group_of_unit[2], group_of_unit[0]])[:, None]  # (G, k=1)
    assert torch.equal(choice.sources, expected)
    assert choice.kept_mass == pytest.approx(1.0)  # every non-zero weight is in a kept block


def test_weight_criterion_keeps_exactly_the_heaviest_blocks_mass():
    """kept_mass is the share of squared weight in the chosen blocks, the k heaviest per row."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8, bias=False)).eval()
    x = torch.randn(64, 8)
    _, (c,) = plan_sparsify(model, [x], groups=4, density=0.5, criterion="weight", exclude=())
    w = model[0].weight.detach()[:, c.in_perm]
    blocks = w.view(4, 2, 4, 2).square().sum((1, 3))  # (out group, in group) squared mass
    heaviest = blocks.topk(2, dim=1)
    assert torch.equal(c.sources.sort(1).values, heaviest.indices.sort(1).values)
    assert c.kept_mass == pytest.approx(float(heaviest.values.sum() / blocks.sum()), rel=1e-6)
