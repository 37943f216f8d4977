"""Group-sparse wiring, the general cases: every decay of the prune schedule at its end points,
the errors each builder gives, initialisation at the fan-in a unit really has, the settings a
policy is rebuilt from, and the Hebbian moments against their definition (issue 18's mutation run)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from brickwork.errors import ConfigError
from brickwork.nn.sparse import (
    ActivationStats,
    GroupConv2d,
    GroupLinear,
    LinearAct,
    PruneSchedule,
    Rewiring,
    RewiringSettings,
    band,
    block_diagonal,
    block_sparse_linear,
    from_matrix,
    in_degree,
    make_pattern,
    random_pattern,
    ring,
    small_world,
    to_matrix,
    top_k,
)
from brickwork.nn.sparse.kernel import sparse_paths
from brickwork.nn.sparse.rewire import swap_blocks, swap_edges
from brickwork.ops.permutation import PermutationSpec, permutation_spec, permute, random_perms

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_prune_schedule_every_decay_at_its_end_points():
    cos = PruneSchedule(interval=5, fraction=0.4, decay="cosine", stop=0.8)
    lin = PruneSchedule(interval=5, fraction=0.4, decay="linear", stop=0.8)
    const = PruneSchedule(interval=5, fraction=0.4, decay="constant", stop=0.8)
    assert [cos.fraction_at(p) for p in (0.0, 0.4)] == [pytest.approx(0.4, abs=1e-15), pytest.approx(0.2, abs=1e-15)]
    assert cos.fraction_at(0.6) == pytest.approx(0.2 * (1 + math.cos(math.pi * 0.75)), abs=1e-15)
    assert [lin.fraction_at(p) for p in (0.0, 0.4, 0.6)] == [0.4, pytest.approx(0.2), pytest.approx(0.1)]
    assert [const.fraction_at(p) for p in (0.0, 0.79)] == [0.4, 0.4]
    for s in (cos, lin, const):
        assert s.fraction_at(0.8) == 0.0 and s.fraction_at(1.0) == 0.0  # frozen from ``stop`` on


def test_prune_schedule_is_due_on_multiples_of_the_interval_before_stop():
    s = PruneSchedule(interval=5, stop=0.8)
    assert [step for step in range(0, 16) if s.due(step, 0.5)] == [5, 10, 15]
    assert s.due(5, 0.79) and not s.due(5, 0.8)
    assert not s.due_at_epoch_end(0.5)  # a step-counted schedule never updates at an epoch end
    epoch = PruneSchedule(interval="epoch", stop=1.0)
    assert not epoch.due(5, 0.5) and epoch.due_at_epoch_end(0.5) and not epoch.due_at_epoch_end(1.0)
    PruneSchedule(interval=1, fraction=0.0, stop=1.0)  # the edges of each range are accepted
    PruneSchedule(fraction=1.0)
    for bad in (
        {"interval": 0},
        {"interval": 2.5},
        {"fraction": -0.1},
        {"fraction": 1.1},
        {"stop": 0.0},
        {"stop": 1.1},
    ):
        with pytest.raises(ValueError, match="PruneSchedule"):
            PruneSchedule(**bad)


def test_patterns_refuse_impossible_shapes():
    for call, match in (
        (lambda: band(0, 4, 1), "group counts"),
        (lambda: band(4, 0, 1), "group counts"),
        (lambda: band(4, 4, 0), "in-degree"),
        (lambda: band(4, 4, 5), "in-degree"),
        (lambda: block_diagonal(3, 4), "not a multiple"),
        (lambda: small_world(4, 4, 2, p=1.5), "rewiring probability"),
        (lambda: small_world(4, 4, 2, p=-0.1), "rewiring probability"),
        (lambda: make_pattern("block_diagonal", 4, 8, 3), "G_in / G_out = 2"),
        (lambda: make_pattern("lattice", 4, 4, 2), "unknown connectivity pattern"),  # type: ignore[arg-type]
        (lambda: top_k(torch.zeros(2, 3), 4), "in-degree"),
        (lambda: top_k(torch.zeros(0, 3), 1), "group counts"),  # no output group to wire
        (lambda: from_matrix(torch.ones(4, dtype=torch.bool)), "expected a"),
        (lambda: from_matrix(torch.tensor([[1, 0], [0, 0]], dtype=torch.bool)), "at least one input group"),
    ):
        with pytest.raises(ValueError, match=match):
            call()
    assert band(4, 4, 4).tolist() == [[0, 1, 2, 3], [1, 2, 3, 0], [2, 3, 0, 1], [3, 0, 1, 2]]  # k = G_in is legal
    assert band(2, 4, 1, offset=1).tolist() == [[1], [3]]


def test_named_patterns_through_make_pattern():
    gen = torch.Generator().manual_seed(0)
    assert make_pattern("block_diagonal", 4, 8, 2).tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert make_pattern("band", 4, 4, 2).equal(band(4, 4, 2))
    assert make_pattern("ring", 4, 4, 3).equal(ring(4, 4, 3))
    full = small_world(4, 4, 4, p=1.0, generator=gen)  # nothing to rewire to: the ring itself
    assert full.equal(ring(4, 4, 4))
    rewired = make_pattern("small_world", 8, 8, 2, p=1.0, generator=torch.Generator().manual_seed(1))
    assert not to_matrix(rewired, 8).equal(to_matrix(ring(8, 8, 2), 8))
    assert all(row == sorted(row) and len(set(row)) == 2 for row in rewired.tolist())
    rows = make_pattern("random", 6, 9, 4, generator=gen).tolist()
    assert all(row == sorted(row) and len(set(row)) == 4 for row in rows)
    counts = to_matrix(random_pattern(6, 9, 4, gen), 9).sum(0)  # 24 edges over 9 groups: 2 or 3 each
    assert int(counts.sum()) == 24 and set(counts.tolist()) <= {2, 3}


def test_in_degree_is_exact_or_refused():
    assert in_degree(0.5, 1.0, 8) == 4 and in_degree(0.125, 0.5, 4) == 1 and in_degree(1.0, 1.0, 3) == 3
    for density, edge in ((0.3, 1.0), (0.05, 1.0), (1.0, 0.5)):
        with pytest.raises(ValueError, match="integer j"):
            in_degree(density, edge, 8)


def test_group_linear_refuses_wiring_that_does_not_fit():
    for kw, match in (
        ({"d_in": 15}, "not divisible"),
        ({"d_out": 7}, "not divisible"),
        ({"connectivity": torch.tensor([[0], [1], [2]])}, "does not fit"),
        ({"connectivity": torch.tensor([[0], [1], [2], [4]])}, "does not fit"),
        ({"connectivity": torch.tensor([[0], [1], [2], [-1]])}, "does not fit"),
        ({"connectivity": torch.tensor([[0, 0], [1, 2], [2, 3], [3, 0]])}, "same input group twice"),
        ({"in_perm": torch.tensor([0] * 16)}, "not a permutation"),
    ):
        args = {"d_in": 16, "d_out": 8, "groups": 4, "density": 0.25, **kw}
        with pytest.raises(ValueError, match=match):
            GroupLinear(**args)
    with pytest.raises(ValueError, match="edge_density < 1"):
        GroupLinear(16, 8, groups=4, density=0.5, rewiring=Rewiring("random", "edge"))


def test_group_linear_is_initialised_for_the_fan_in_a_unit_has():
    """Uniform with bound 1/sqrt(fan-in): K = k * b_in inputs without an edge mask, the mask's
    active inputs per unit with one; masked weights start at zero."""
    torch.manual_seed(0)
    plain = GroupLinear(64, 32, groups=4, density=0.5)  # k = 2, b_in = 16: fan-in 32
    bound = 1 / math.sqrt(32)
    for t in (plain.weight, plain.bias):
        assert float(t.detach().abs().max()) <= bound and float(t.detach().abs().max()) > 0.9 * bound
    masked = GroupLinear(64, 32, groups=4, density=0.25, edge_density=0.5)  # 8 of 32 inputs per unit
    bound = 1 / math.sqrt(float(masked.mask.sum()) / 32)
    w = masked.weight.detach()
    assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.9 * bound
    assert not w[~masked.mask].any() and float(masked.bias.detach().abs().max()) > 0.9 * bound
    assert masked.density == 0.25 and plain.density == 0.5
    assert repr(masked) == "GroupLinear(64, 32, groups=4->4, k=2, density=0.250, bias=True)"
    assert GroupLinear(16, 8, groups=4, density=0.5, bias=False).bias is None


def test_group_linear_bias_and_in_perm_reach_every_path():
    """The dense path equals the gather path, bias and input permutation included; an unknown path is refused."""
    torch.manual_seed(0)
    layer = GroupLinear(16, 8, groups=2, groups_in=4, density=0.5, in_perm=torch.randperm(16))
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(5, 16)
    ref = F.linear(x, layer.dense_weight(), layer.bias)
    for path in ("gather", "dense", "band"):
        torch.testing.assert_close(block_sparse_linear(x, layer.weight, layer.bias, layer.plan(), path), ref)
    with pytest.raises(ValueError, match="unknown path"):
        block_sparse_linear(x, layer.weight, layer.bias, layer.plan(), "sparse")  # type: ignore[arg-type]
    assert "band" not in sparse_paths(layer.plan())
    assert "band" in sparse_paths(GroupLinear(16, 16, groups=4, density=0.5, pattern="band").plan())


def test_group_conv_refuses_bad_wiring_and_starts_at_its_fan_in():
    for kw, match in (
        ({"c_in": 7}, "not divisible"),
        ({"c_out": 6}, "not divisible"),
        ({"connectivity": torch.tensor([[0], [1], [2]])}, "rows of distinct groups"),
        ({"connectivity": torch.tensor([[0, 0], [1, 2], [2, 3], [3, 0]])}, "rows of distinct groups"),
        ({"connectivity": torch.tensor([[0], [1], [2], [4]])}, "in 0..3"),  # used to fail in forward
        ({"connectivity": torch.tensor([[0], [1], [2], [-1]])}, "in 0..3"),
    ):
        with pytest.raises(ValueError, match=match):
            GroupConv2d(**{"c_in": 8, "c_out": 8, "groups": 4, **kw})
    torch.manual_seed(0)
    conv = GroupConv2d(8, 8, kernel_size=3, groups=4, density=0.5)  # k = 2 groups of 2 channels, 3x3
    bound = 1 / math.sqrt(2 * 2 * 9)
    assert 0.9 * bound < float(conv.weight.detach().abs().max()) <= bound
    assert 0.8 * bound < float(conv.bias.detach().abs().max()) <= bound
    assert conv.density == 0.5 and conv.k == 2
    assert repr(conv) == "GroupConv2d(8, 8, kernel=3, stride=1, groups=4->4, k=2)"
    given = GroupConv2d(
        8, 4, kernel_size=1, padding=0, groups=2, groups_in=4, connectivity=torch.tensor([[3], [0]]), bias=False
    )
    x = torch.randn(1, 8, 3, 3)
    torch.testing.assert_close(given(x), F.conv2d(x, given.dense_weight()))
    assert given.bias is None and not given.dense_weight()[:2, :6].any()  # output group 0 reads channels 6, 7 only


def test_rewiring_settings_rebuild_the_policy_and_refuse_unused_keys():
    s = RewiringSettings(regrow="hebbian", level="both", interval=4, fraction=0.2, decay="linear", stop=0.5, window=3)
    policy = s.policy()
    assert policy.config() == {
        "regrow": "hebbian",
        "level": "both",
        "interval": 4,
        "fraction": 0.2,
        "decay": "linear",
        "stop": 0.5,
        "window": 3,
        "momentum": 0.99,
    }
    again = Rewiring(**policy.config())
    assert again.config() == policy.config() and again.edges and again.groups
    assert RewiringSettings(regrow="hebbian", momentum=0.5).policy().config()["momentum"] == 0.5
    assert RewiringSettings(regrow="random").policy("edge").level == "edge"
    assert RewiringSettings(regrow="random").policy().level == "group"
    assert RewiringSettings().policy() is None
    g = Rewiring("random", "group")
    assert g.groups and not g.edges and not Rewiring("random", "edge").groups
    RewiringSettings().check("models.a")  # static wiring at the defaults: nothing to refuse
    with pytest.raises(ConfigError, match=r"^models\.a\.window: is a rewiring setting"):
        RewiringSettings(window=7).check("models.a")
    with pytest.raises(ConfigError, match=r"^momentum: is a rewiring setting"):
        RewiringSettings(momentum=0.5).check()
    with pytest.raises(ConfigError, match=r"^interval: 'epoch'"):
        RewiringSettings(regrow="hebbian", interval="epoch").check()
    RewiringSettings(regrow="random", interval="epoch").check()
    with pytest.raises(ValueError, match="needs regrow 'random'"):
        Rewiring("gradient", interval="epoch")


def test_rewiring_settings_messages_name_the_key_the_rule_and_the_value():
    """The whole messages: the key path (with and without a prefix), why the value is refused, the
    default to go back to and the value given. ``interval: epoch`` with ``regrow: none`` is an
    unused setting, not a schedule that needs another regrowth."""
    cases = (
        (
            RewiringSettings(regrow="hebbian", interval="epoch"),
            "models.g",
            "models.g.interval: 'epoch' (SET's schedule) needs regrow 'random'; hebbian needs a step count "
            "(got 'epoch')",
        ),
        (
            RewiringSettings(regrow="gradient", interval="epoch"),
            "",
            "interval: 'epoch' (SET's schedule) needs regrow 'random'; gradient needs a step count (got 'epoch')",
        ),
        (
            RewiringSettings(interval="epoch"),
            "",
            "interval: is a rewiring setting, unused with regrow 'none' (static wiring); set regrow (random, "
            "gradient or hebbian) or leave it at its default 100 (got 'epoch')",
        ),
        (
            RewiringSettings(decay="linear"),
            "m",
            "m.decay: is a rewiring setting, unused with regrow 'none' (static wiring); set regrow (random, "
            "gradient or hebbian) or leave it at its default 'cosine' (got 'linear')",
        ),
    )
    for settings, path, message in cases:
        with pytest.raises(ConfigError) as err:
            settings.check(path)
        assert str(err.value) == message


def test_swaps_clip_to_what_can_move():
    gen = torch.Generator().manual_seed(0)
    weight = torch.arange(1.0, 9.0).view(1, 2, 4)
    mask = torch.tensor([[[1, 1, 1, 0], [1, 1, 1, 0]]], dtype=torch.bool)
    assert swap_edges(weight.clone(), mask.clone(), 0, None, gen) == 0
    w, m = weight.clone(), mask.clone()
    assert swap_edges(w, m, 5, None, gen) == 2  # only two inactive edges to grow into
    assert int(m.sum()) == 6 and m[0, :, 3].all() and not m[0, :, :2].all()
    assert swap_blocks(torch.tensor([[0, 1], [1, 0]]), 2, torch.ones(2, 2), 1, None, gen) == []  # k = G_in
    src = torch.tensor([[0, 1], [2, 3]])
    moves = swap_blocks(src, 4, torch.tensor([[0.1, 5.0], [4.0, 3.0]]), 9, torch.arange(8.0).view(2, 4), gen)
    assert moves == [(0, 0, 3), (1, 1, 1), (1, 0, 0), (0, 1, 2)]  # weakest block first, to the best free group
    assert swap_blocks(torch.tensor([[0, 1]]), 3, torch.tensor([[1.0, 2.0]]), 2, None, gen) == [(0, 0, 2)]


def test_group_statistics_are_the_ema_of_batch_moments_and_give_pearson_correlations():
    torch.manual_seed(0)
    stats = ActivationStats(3, 2, momentum=0.75)
    a_in, a_out = torch.randn(3, 50, dtype=torch.float64), torch.randn(2, 50, dtype=torch.float64)
    a_out[1] = 2 * a_in[0] + 0.1 * a_out[1]
    stats.double().update_groups(a_in, a_out)  # the first batch sets the averages
    corr = torch.corrcoef(torch.cat([a_out, a_in]))[:2, 2:]
    torch.testing.assert_close(stats.group_correlation(), corr, rtol=0, atol=1e-10)
    b_in, b_out = torch.randn(3, 50, dtype=torch.float64), torch.randn(2, 50, dtype=torch.float64)
    stats.update_groups(b_in, b_out)
    torch.testing.assert_close(stats.g_in_mean, 0.75 * a_in.mean(1) + 0.25 * b_in.mean(1), rtol=0, atol=1e-12)
    torch.testing.assert_close(stats.g_out_sq, 0.75 * (a_out**2).mean(1) + 0.25 * (b_out**2).mean(1))
    cross = 0.75 * a_out @ a_in.t() / 50 + 0.25 * b_out @ b_in.t() / 50
    torch.testing.assert_close(stats.g_cross, cross, rtol=0, atol=1e-12)
    assert int(stats.g_seen) == 2


def test_edge_statistics_give_the_pearson_correlation_of_each_connected_pair_and_reset():
    torch.manual_seed(0)
    layer = GroupLinear(8, 4, groups=2, density=0.5)  # k = 1 of 2 input groups (b_in 4), b_out 2
    stats = ActivationStats(2, 2, tuple(layer.weight.shape), 8, 4).double()
    x = torch.randn(40, 8, dtype=torch.float64)
    y = x @ torch.randn(8, 4, dtype=torch.float64) + torch.randn(40, 4, dtype=torch.float64)
    plan = layer.plan()
    for xs, ys in ((x[:20], y[:20]), (x[20:], y[20:])):
        xt, yt = xs.t(), ys.t()
        stats.accumulate_edges(xt, yt, xt.index_select(0, plan.fwd_rows).view(2, -1, xt.shape[1]))
    corr = torch.corrcoef(torch.cat([y.t(), x.t()]))[:4, 4:]  # (d_out, d_in)
    expected = corr.view(2, 2, 8).gather(2, plan.fwd_rows.view(2, 1, -1).expand(2, 2, 4))
    torch.testing.assert_close(stats.edge_correlation(plan.fwd_rows), expected, rtol=0, atol=1e-10)
    stats.reset_edges()
    assert int(stats.e_n) == 0 and not stats.e_xy.any() and not stats.e_x.any() and not stats.e_yy.any()


def test_linear_act_is_dropout_of_act_of_the_given_linear():
    """Defaults: GELU, no dropout (also in training); ``act`` and ``dropout`` are applied in that order."""
    torch.manual_seed(0)
    linear = nn.Linear(6, 5, dtype=torch.float64)
    x = torch.randn(3, 4, 6, dtype=torch.float64)
    plain = LinearAct(linear).train()
    assert plain.linear is linear and plain.act_name == "gelu"
    torch.testing.assert_close(plain(x), F.gelu(linear(x)), rtol=0, atol=0)  # p = 0: even training keeps all
    relu = LinearAct(linear, "relu", dropout=0.5).eval()
    assert relu.act_name == "relu"
    torch.testing.assert_close(relu(x), F.relu(linear(x)), rtol=0, atol=0)
    relu.train()
    y = relu(x)
    kept = y != 0
    assert 0 < int(kept.sum()) < int((F.relu(linear(x)) != 0).sum())  # some units dropped, the rest scaled by 2
    torch.testing.assert_close(y[kept], 2 * F.relu(linear(x))[kept], rtol=0, atol=1e-15)


def _declared(spec: PermutationSpec) -> dict[str, tuple[int, str | None, list[str], list[str]]]:
    """Each free permutation: its size, parent, the axes it moves (``tensor:dim``, ``bN`` batched
    over axis N, ``v`` remapped values) and where it is probed (``module:dim``)."""
    out = {}
    for n in spec.free():
        p = spec.perms[n]
        axes = sorted(
            f"{a.tensor}:{a.dim}"
            + (f"@{a.offset}" if a.offset else "")
            + (f"b{a.batch_dim}" if a.batch_dim is not None else "")
            + ("v" if a.values else "")
            for a in spec.axes
            if a.perm == n
        )
        probes = sorted(f"{q.module}:{q.dim}" + ("i" if q.input else "") for q in spec.probes if q.perm == n)
        out[n] = (p.size, p.parent, axes, probes)
    return out


def test_group_linear_and_linear_act_declare_their_permutations_and_keep_the_function():
    """Between two dense layers: the input units (absorbed by ``in_perm``'s values), the output
    groups (sources, weight and mask rows) and the units inside each group (nested: weight and mask
    batched over the groups, bias, the next layer's columns), probed at the layer's (and the
    ``LinearAct``'s) output. A random one of them leaves the function unchanged; with rewiring
    attached nothing is free."""
    torch.manual_seed(0)
    masked = GroupLinear(8, 8, groups=2, groups_in=4, density=0.25, edge_density=0.5, in_perm=torch.randperm(8))
    with_act = nn.Sequential(nn.Linear(8, 8), LinearAct(masked, "relu"), nn.Linear(8, 8))
    plain = nn.Sequential(nn.Linear(8, 8), GroupLinear(8, 8, groups=4, density=0.5, bias=False), nn.Linear(8, 8))
    cases = {
        "with_act": (
            with_act,
            {
                "p1": (8, None, ["0.bias:0", "0.weight:0", "1.linear.in_perm:0v"], ["0:-1"]),
                "1.linear.groups": (2, None, ["1.linear.mask:0", "1.linear.sources:0", "1.linear.weight:0"], []),
                "1.linear.out": (
                    4,
                    "1.linear.groups",
                    ["1.linear.bias:0", "1.linear.mask:1b0", "1.linear.weight:1b0", "2.weight:1"],
                    ["1.linear:-1", "1:-1"],
                ),
            },
        ),
        "plain": (
            plain,
            {
                "p1": (8, None, ["0.bias:0", "0.weight:0", "1.in_perm:0v"], ["0:-1"]),
                "1.groups": (4, None, ["1.sources:0", "1.weight:0"], []),
                "1.out": (2, "1.groups", ["1.weight:1b0", "2.weight:1"], ["1:-1"]),
            },
        ),
    }
    x = torch.randn(5, 8, dtype=torch.float64)
    for name, (model, expected) in cases.items():
        model = model.double().eval()
        spec = permutation_spec(model)
        assert _declared(spec) == expected, name
        other = permute(model, random_perms(spec, torch.Generator().manual_seed(1)), spec).eval()
        moved = [k for k, v in model.state_dict().items() if not torch.equal(v, other.state_dict()[k])]
        assert {"0.weight", "2.weight"} <= set(moved), name
        with torch.no_grad():
            torch.testing.assert_close(other(x), model(x), rtol=0, atol=1e-12)
    rewired = GroupLinear(8, 8, groups=4, density=0.5, rewiring=Rewiring("random", "group"))
    assert permutation_spec(nn.Sequential(nn.Linear(8, 8), LinearAct(rewired), nn.Linear(8, 8))).free() == []


def test_a_one_row_edge_window_correlates_nothing():
    """One sample has no variance: every correlation is 0 (not the +-1 of moments divided by 2)."""
    layer = GroupLinear(8, 4, groups=2, density=0.5)
    stats = ActivationStats(2, 2, tuple(layer.weight.shape), 8, 4).double()
    plan = layer.plan()
    xt, yt = torch.randn(8, 1, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64)
    stats.accumulate_edges(xt, yt, xt.index_select(0, plan.fwd_rows).view(2, -1, 1))
    assert int(stats.e_n) == 1
    assert torch.equal(stats.edge_correlation(plan.fwd_rows), torch.zeros(2, 2, 4, dtype=torch.float64))


def test_group_conv_defaults_edge_cases_device_and_dtype():
    """Defaults: 4 groups at density 0.5 (k = 2), 3x3, padding 1. One single connected pair is a
    valid wiring; an empty one is refused with the layer's message. Parameters, the wiring and the
    gathered channel index are made on the device and in the dtype asked for."""
    torch.manual_seed(0)
    conv = GroupConv2d(8, 8)
    assert (conv.groups_out, conv.groups_in, conv.k, conv.weight.shape) == (4, 4, 2, (8, 4, 3, 3))
    one = GroupConv2d(4, 4, groups=1, connectivity=torch.tensor([[0]]))
    assert one.k == 1 and one(torch.randn(1, 4, 3, 3)).shape == (1, 4, 3, 3)
    with pytest.raises(ValueError, match="rows of distinct groups"):
        GroupConv2d(8, 8, groups=4, connectivity=torch.zeros(4, 0, dtype=torch.long))
    meta = GroupConv2d(8, 8, groups=4, device="meta", dtype=torch.float64)
    assert meta.bias is not None
    for t in (meta.weight, meta.bias, meta.sources, meta.channel_index()):
        assert t.device.type == "meta", t.shape
    assert meta.weight.dtype == meta.bias.dtype == torch.float64
    y = meta(torch.randn(2, 8, 5, 5, device="meta", dtype=torch.float64))
    assert y.device.type == "meta" and y.shape == (2, 8, 5, 5)


def test_activation_stats_defaults_and_exact_counters():
    """The EMA factor defaults to 0.99; the batch and row counters are integers (exact for any
    number of steps, and what a checkpoint stores)."""
    stats = ActivationStats(2, 3, (3, 1, 4), 8, 3)
    assert stats.momentum == 0.99
    assert stats.g_seen.dtype == stats.e_n.dtype == torch.long
    assert (stats.g_cross.shape, stats.e_xy.shape, stats.e_x.shape, stats.e_y.shape) == ((3, 2), (3, 1, 4), (8,), (3,))


@pytest.mark.parametrize("scale", [0.1, 10.0])
def test_correlations_do_not_depend_on_the_activations_scale(scale):
    """Pearson correlation is scale-free: activities of variance 0.01 or 100 give torch.corrcoef's value."""
    torch.manual_seed(0)
    a_in, a_out = torch.randn(3, 40, dtype=torch.float64), torch.randn(2, 40, dtype=torch.float64)
    a_out[1] += a_in[2]
    stats = ActivationStats(3, 2).double()
    stats.update_groups(scale * a_in, scale * a_out)
    corr = torch.corrcoef(torch.cat([a_out, a_in]))[:2, 2:]
    torch.testing.assert_close(stats.group_correlation(), corr, rtol=0, atol=1e-10)


def test_rewiring_defaults_buffers_and_what_bind_sizes():
    """RigL's schedule at group level by default. Counters are integers and progress is float64
    (0.75 - 1e-9 is still before ``stop`` 0.75). Seeds differ between policies, so two layers do
    not regrow alike. A Hebbian group-level policy keeps no edge statistics; its statistics get the
    policy's momentum and the layer's device."""
    assert Rewiring().config() == {
        "regrow": "gradient",
        "level": "group",
        "interval": 100,
        "fraction": 0.3,
        "decay": "cosine",
        "stop": 0.75,
        "window": 20,
        "momentum": 0.99,
    }
    torch.manual_seed(0)
    policy = Rewiring()
    for name in ("step", "seed", "edges_moved", "blocks_moved"):
        assert getattr(policy, name).dtype == torch.long, name
    policy.set_progress(0.75 - 1e-9)
    assert policy.progress.dtype == torch.float64 and float(policy.progress) < 0.75
    assert len({int(Rewiring().seed) for _ in range(20)}) == 20
    with pytest.raises(ValueError) as err:
        GroupLinear(16, 8, groups=4, density=0.5, rewiring=Rewiring("random", "edge"))
    assert str(err.value) == "edge-level rewiring needs an edge mask: build the layer with edge_density < 1"
    group = GroupLinear(16, 16, groups=4, density=0.5, rewiring=Rewiring("hebbian", "group", momentum=0.5))
    assert group.rewiring.stats is not None and not group.rewiring.stats.edges
    assert group.rewiring.stats.momentum == 0.5 and not any(
        k.startswith("rewiring.stats.e_") for k in group.state_dict()
    )
    meta = GroupLinear(16, 16, groups=4, density=0.5, device="meta", rewiring=Rewiring("hebbian", "group"))
    assert meta.rewiring.stats is not None and meta.rewiring.stats.g_cross.device.type == "meta"
