"""Edge-level rewiring as G2GNet, SET and RigL do it: single edges, anywhere, at the papers' schedules."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from brickwork.errors import ConfigError
from brickwork.models.sparse_mlp import sparse_mlp
from brickwork.nn.sparse import GroupLinear, RewiringSettings, edge_wired, ring, to_matrix


def layer_with(regrow: str, **kw) -> tuple[GroupLinear, torch.Tensor]:
    """A 16 -> 16 layer, 4 x 4 groups, 25% density; with it the (16, 16) initial edge set."""
    torch.manual_seed(0)
    layer = edge_wired(16, 16, groups=4, density=0.25, rewiring=RewiringSettings(regrow=regrow, **kw).policy("edge"))
    with torch.no_grad():  # distinct magnitudes: which edges are the smallest is unambiguous
        layer.weight.copy_(torch.randperm(256).view(layer.weight.shape).float().add(1) / 256 * layer.mask)
    return layer, layer.mask.clone()


def dense(t: torch.Tensor) -> torch.Tensor:
    # Every block stored, slot j reading input group j (identity in_perm): the compressed
    # (G_out, b_out, G_in * b_in) layout is the dense (d_out, d_in) one.
    return t.reshape(16, 16)


def test_the_layer_starts_as_the_group_pattern_and_stores_every_block():
    layer, mask = layer_with("random")
    assert layer.k == 4 and layer.density == 0.25
    blocks = dense(mask).view(4, 4, 4, 4).permute(0, 2, 1, 3)  # (G_out, G_in, b_out, b_in)
    on = blocks.all(-1).all(-1)
    assert torch.equal(on, blocks.any(-1).any(-1)) and (on.sum(1) == 1).all()  # whole blocks, 1 of 4 each
    x = torch.randn(5, 16)
    torch.testing.assert_close(layer(x), F.linear(x, layer.dense_weight(), layer.bias))


def test_set_moves_zeta_of_the_edges_after_each_epoch_keeping_the_largest_and_regrowing_outside_the_blocks():
    layer, before = layer_with("random")
    active = int(before.sum())
    w_before = layer.weight.detach().clone()
    for _ in range(5):  # SET's schedule is per epoch: optimizer steps move nothing
        layer.after_step()
    assert torch.equal(layer.mask, before)
    layer.rewiring.set_progress(0.5)
    layer.after_epoch()
    n = round(0.3 * active)  # ζ = 0.3, constant
    kept, grown = layer.mask & before, layer.mask & ~before
    assert int(layer.rewiring.edges_moved) == n and int(grown.sum()) == n and int(layer.mask.sum()) == active
    largest = w_before.abs().flatten().topk(active - n).indices
    assert set(kept.flatten().nonzero().flatten().tolist()) == set(largest.tolist())
    assert (layer.weight[grown] == 0).all()
    pattern = dense(before).view(4, 4, 4, 4).any(3).any(1)  # (G_out, G_in) blocks of the initial pattern
    landed = dense(grown).view(4, 4, 4, 4).any(3).any(1)
    assert (landed & ~pattern).any()  # grown in group pairs that were not connected
    layer.rewiring.set_progress(1.0)  # the last epoch's end: no update (stop 1.0)
    layer.after_epoch()
    assert int(layer.rewiring.edges_moved) == n


def test_rigl_moves_its_cosine_fraction_to_the_largest_dense_gradients_anywhere():
    layer, before = layer_with("gradient", interval=1)
    active = int(before.sum())
    x, target = torch.randn(32, 16), torch.randn(32, 16)
    layer.rewiring.set_progress(0.25)
    (layer(x) - target).square().sum().backward()
    w = layer.dense_weight().clone().requires_grad_(True)
    (F.linear(x, w, layer.bias) - target).square().sum().backward()
    magnitude = layer.weight.detach().abs().flatten().clone()
    layer.after_step()
    frac = 0.3 * 0.5 * (1 + math.cos(math.pi * 0.25 / 0.75))  # α = 0.3, cosine to T_end = 0.75
    n = round(frac * active)
    grown = layer.mask & ~before
    assert int(grown.sum()) == n == int(layer.rewiring.edges_moved)
    inactive_grad = w.grad.abs().flatten().masked_fill(before.flatten(), -1)
    assert set(grown.flatten().nonzero().flatten().tolist()) == set(inactive_grad.topk(n).indices.tolist())
    kept = magnitude.masked_fill(~before.flatten(), -1).topk(active - n).indices
    assert set((layer.mask & before).flatten().nonzero().flatten().tolist()) == set(kept.tolist())
    assert not (dense(grown).view(4, 4, 4, 4).any(3).any(1) <= dense(before).view(4, 4, 4, 4).any(3).any(1)).all()


def test_the_loop_rewires_at_epoch_ends_and_zeroes_the_moments_of_regrown_edges():
    from brickwork.train.loop import FitConfig, run_epoch

    layer, before = layer_with("random")
    model = nn.Sequential(layer, nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 16, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(3)]
    cfg = FitConfig(epochs=2, batch_size=8, seed=0, schedule="constant")
    run_epoch(model, data, F.cross_entropy, opt, cfg, step0=0, total_steps=6)
    grown = layer.mask & ~before
    assert int(grown.sum()) == round(0.3 * int(before.sum())) and layer.take_regrown() == []
    state = opt.state[layer.weight]
    for name in ("exp_avg", "exp_avg_sq"):
        assert (state[name][grown] == 0).all(), name
        assert (state[name][layer.mask & before] != 0).any(), name
    mask = layer.mask.clone()
    run_epoch(model, data, F.cross_entropy, opt, cfg, step0=3, total_steps=6)
    assert torch.equal(layer.mask, mask)  # after the last epoch SET does not rewire


def test_settings_default_to_each_papers_schedule_and_sparse_mlp_to_edges_anywhere():
    set_, rigl = RewiringSettings(regrow="random"), RewiringSettings(regrow="gradient")
    assert (set_.interval, set_.fraction, set_.decay, set_.stop) == ("epoch", 0.3, "constant", 1.0)
    assert (rigl.interval, rigl.fraction, rigl.decay, rigl.stop) == (100, 0.3, "cosine", 0.75)
    assert RewiringSettings(regrow="random", interval=7).interval == 7
    with pytest.raises(ConfigError, match="interval"):
        RewiringSettings(regrow="gradient", interval="epoch").check("models.g2g")
    torch.manual_seed(0)
    edge = sparse_mlp((64,), 10, width=32, depth=1, groups=4, density=0.25, rewiring=rigl)
    blocks = RewiringSettings("gradient", "group")
    block = sparse_mlp((64,), 10, width=32, depth=1, groups=4, density=0.25, rewiring=blocks)
    for model, k, level in ((edge, 4, "edge"), (block, 1, "group")):
        layers = [m for m in model.modules() if isinstance(m, GroupLinear)]
        assert [m.k for m in layers] == [k, k] and all(m.rewiring.level == level for m in layers)
        assert all(math.isclose(m.density, 0.25) for m in layers)
    assert all(to_matrix(m.sources, 4).all() for m in edge.modules() if isinstance(m, GroupLinear))


def _blocks(layer: GroupLinear) -> torch.Tensor:
    """(G_out, G_in) which blocks of an edge-wired layer have an active edge."""
    g_out, b_out, _ = layer.mask.shape
    return layer.mask.view(g_out, b_out, layer.groups_in, -1).any(3).any(1)


def test_edge_wired_defaults_groups_in_and_the_small_world_pattern():
    """Defaults: 16 groups each way, density 0.25. Every block is stored (slot j reads input group
    j) also when input and output group counts differ; the initial edges are exactly the pattern's
    blocks, and ``small_world_p`` reaches the pattern (0: the ring itself; 1: every edge moved;
    default 0.1)."""
    torch.manual_seed(0)
    default = edge_wired(64, 64)
    assert (default.groups_out, default.groups_in, default.k, default.density) == (16, 16, 16, 0.25)
    uneven = edge_wired(16, 8, groups=4, groups_in=2, density=0.5)  # k = 1 of 2 input groups
    assert (uneven.groups_out, uneven.groups_in, uneven.k) == (4, 2, 2) and uneven.density == 0.5
    assert uneven.sources.tolist() == [[0, 1]] * 4 and (_blocks(uneven).sum(1) == 1).all()
    half = edge_wired(16, 16, groups=4, density=0.5, pattern="ring", small_world_p=0.0)
    assert half.k == 4 and half.sources.tolist() == [[0, 1, 2, 3]] * 4
    assert torch.equal(_blocks(half), to_matrix(ring(4, 4, 2), 4)) and half.mask.view(4, 4, 4, 4).sum() == 128
    lattice = to_matrix(ring(8, 8, 2), 8)
    assert torch.equal(_blocks(edge_wired(32, 32, groups=8, pattern="small_world", small_world_p=0.0)), lattice)
    moved = _blocks(edge_wired(32, 32, groups=8, pattern="small_world", small_world_p=1.0))
    assert not torch.equal(moved, lattice) and (moved.sum(1) == 2).all()
    torch.manual_seed(3)
    default_p = edge_wired(32, 32, groups=8, pattern="small_world")
    torch.manual_seed(3)
    assert torch.equal(default_p.mask, edge_wired(32, 32, groups=8, pattern="small_world", small_world_p=0.1).mask)
