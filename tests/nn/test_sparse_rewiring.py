"""Dynamic sparse training: density held through prune/regrow, Hebbian and RigL choices, exact resume."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from brickwork.nn.hooks import after_optimizer_step
from brickwork.nn.sparse import GroupLinear, PruneSchedule, Rewiring

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def masked_reference(layer: GroupLinear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, layer.dense_weight() * layer.connectivity_mask(), layer.bias)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range, total: int, check=None) -> None:
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(32, 16, generator=gen), torch.randint(0, 3, (32,), generator=gen)) for _ in range(total)]
    for step in steps:
        x, y = data[step]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        after_optimizer_step(model, (step + 1) / (2 * total))
        if check is not None:
            check(x)


def quarter_dense_16(rewiring: Rewiring) -> GroupLinear:
    """The rewired layer most tests here use: 16 -> 16 in 4 groups, a quarter of the blocks, half
    the edges inside each."""
    return GroupLinear(16, 16, groups=4, density=0.25, edge_density=0.5, rewiring=rewiring)


@pytest.mark.parametrize("regrow", ["random", "gradient", "hebbian"])
def test_prune_regrow_cycles_hold_density_and_in_degree(regrow):
    layer = quarter_dense_16(Rewiring(regrow, "both", interval=2, fraction=0.5, window=2))
    model = nn.Sequential(layer, nn.ReLU(), nn.Linear(16, 3))
    edges, sources0, mask0 = int(layer.mask.sum()), layer.sources.clone(), layer.mask.clone()
    before = {"sources": layer.sources.clone(), "mask": layer.mask.clone()}

    def check(x: torch.Tensor) -> None:
        assert int(layer.mask.sum()) == edges and layer.density == 0.25
        assert all(len(set(row)) == 2 for row in layer.sources.tolist())
        w = layer.weight.detach().view(4, 4, 2, 4)
        moved = layer.sources != before["sources"]
        assert (w[moved.nonzero(as_tuple=True)[0], :, moved.nonzero(as_tuple=True)[1]] == 0).all()  # grown at zero
        grown = (layer.mask & ~before["mask"]).view(4, 4, 2, 4) & ~moved[:, None, :, None]
        assert (w[grown] == 0).all()
        with torch.no_grad():
            torch.testing.assert_close(layer(x), masked_reference(layer, x))
        before.update(sources=layer.sources.clone(), mask=layer.mask.clone())

    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    train(model, opt, range(10), 10, check)
    assert int(layer.rewiring.blocks_moved) > 0 and int(layer.rewiring.edges_moved) > 0
    assert not layer.sources.equal(sources0) and not layer.mask.equal(mask0)


def test_schedule_decays_like_rigl_and_stops():
    s = PruneSchedule(interval=10, fraction=0.4, decay="cosine", stop=0.5)
    assert s.fraction_at(0.0) == pytest.approx(0.4)
    assert s.fraction_at(0.25) == pytest.approx(0.2)
    assert s.fraction_at(0.5) == 0.0
    assert s.due(20, 0.3) and not s.due(21, 0.3) and not s.due(20, 0.6)


def test_hebbian_regrows_the_most_correlated_input_group():
    # Block-diagonal wiring; input group 2 is a copy of group 0, so output group 0 (which reads
    # group 0) is most correlated with input group 2 among the groups it does not read.
    layer = GroupLinear(
        16,
        8,
        groups=4,
        density=0.25,
        pattern="block_diagonal",
        rewiring=Rewiring("hebbian", "group", interval=1, fraction=0.25),
    )
    with torch.no_grad():
        layer.weight[0] *= 0.01  # the weakest block: the one dropped
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.randn(64, 16, generator=gen)
        x[:, 8:12] = x[:, 0:4]
        layer(x)
    layer.after_step()
    assert layer.sources.tolist() == [[2], [1], [2], [3]]


def test_hebbian_regrows_the_most_correlated_edge():
    layer = GroupLinear(
        8,
        4,
        groups=1,
        density=5 / 32,
        edge_density=5 / 32,
        rewiring=Rewiring("hebbian", "edge", interval=1, fraction=0.2, window=5),
    )
    with torch.no_grad():
        layer.mask.zero_()
        layer.weight.zero_()
        layer.bias.zero_()
        for j in range(4):
            layer.mask[0, j, j] = True
            layer.weight[0, j, j] = 1.0
        layer.mask[0, 3, 5] = True
        layer.weight[0, 3, 5] = 1e-3  # the weakest edge: the one dropped
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.randn(64, 8, generator=gen)
        x[:, 6] = x[:, 0]  # y_0 = x_0 = x_6: edge (0, 6) is the most correlated inactive one
        layer(x)
    layer.after_step()
    assert layer.mask[0, 0, 6] and not layer.mask[0, 3, 5] and int(layer.mask.sum()) == 5
    assert layer.weight[0, 0, 6] == 0.0


def _hebbian_pair(level: str) -> tuple[GroupLinear, GroupLinear]:
    torch.manual_seed(0)
    kwargs = {"groups": 4, "density": 0.5} | ({"edge_density": 0.5} if level == "edge" else {})
    a = GroupLinear(16, 8, rewiring=Rewiring("hebbian", level, interval=3, fraction=0.25, window=3), **kwargs).double()
    return a, copy.deepcopy(a)


@pytest.mark.parametrize("level", ["group", "edge"])
def test_hebbian_sums_kept_for_the_ranks_then_folded_equal_the_sums_folded_at_once(level):
    # Data parallelism keeps each forward's sums (defer_statistics), adds the ranks' slices and
    # folds them: with one "rank" holding the whole batch that must be the one-process statistics.
    now, later = _hebbian_pair(level)
    later.rewiring.defer_statistics = True
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(10, 16, generator=gen, dtype=torch.float64)
        now(x), later(x)
        assert later.rewiring.batch_statistics()  # kept, not folded
        with pytest.raises(RuntimeError, match="never reduced"):
            later.after_step()  # an update before the ranks' sum would act on one rank's slice
        later.rewiring.fold_statistics()
        assert not later.rewiring.batch_statistics()
        now.after_step(), later.after_step()
    assert int(now.rewiring.step) == 3 and int(now.rewiring.edges_moved) + int(now.rewiring.blocks_moved) > 0
    for (k, v), (k2, w) in zip(now.state_dict().items(), later.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, w), k


def test_a_borrowed_row_adds_nothing_to_the_hebbian_sums():
    layer, _ = _hebbian_pair("edge")
    layer.rewiring.defer_statistics = True
    layer.rewiring.counted = False  # this rank computes on a borrowed row
    layer(torch.randn(1, 16, dtype=torch.float64))
    kept = layer.rewiring.batch_statistics()
    assert len(kept) == 12 and all(torch.count_nonzero(t) == 0 for t in kept)  # group and edge sums, rows = 0
    layer.rewiring.fold_statistics()
    layer.rewiring.counted = True
    layer(torch.randn(5, 16, dtype=torch.float64))
    rows = [float(t) for t in layer.rewiring.batch_statistics() if t.dim() == 0]
    assert rows == [5.0, 5.0]


def test_rigl_block_scores_are_the_dense_gradient_and_pick_its_largest_block():
    layer = GroupLinear(
        16, 16, groups=4, density=0.5, rewiring=Rewiring("gradient", "group", interval=1, fraction=0.125)
    )
    x = torch.randn(32, 16)
    target = torch.randn(32, 16)
    (layer(x) - target).square().sum().backward()
    w = layer.dense_weight().clone().requires_grad_(True)
    (F.linear(x, w, layer.bias) - target).square().sum().backward()
    expected = w.grad.view(4, 4, 4, 4).square().sum((1, 3)).sqrt()
    torch.testing.assert_close(layer.rewiring._dense_block_grad(layer), expected, rtol=1e-4, atol=1e-5)
    rms = Rewiring._block_magnitude(layer)
    o, j = divmod(int(rms.argmin()), 2)
    unconnected = expected[o].clone()
    unconnected[layer.sources[o]] = -1
    layer.after_step()
    assert int(layer.sources[o, j]) == int(unconnected.argmax())


def test_resume_from_a_checkpoint_reproduces_the_topology_exactly():
    def build(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(seed)
        layer = quarter_dense_16(Rewiring("random", "both", interval=2, fraction=0.5))
        model = nn.Sequential(layer, nn.ReLU(), nn.Linear(16, 3))
        return model, torch.optim.AdamW(model.parameters(), lr=0.01)

    straight, opt = build(0)
    train(straight, opt, range(8), 8)
    first, opt = build(0)
    train(first, opt, range(4), 8)
    state, opt_state = copy.deepcopy(first.state_dict()), copy.deepcopy(opt.state_dict())
    resumed, opt2 = build(1)  # a different initial topology, overwritten by the checkpoint
    resumed.load_state_dict(state)
    opt2.load_state_dict(opt_state)
    train(resumed, opt2, range(4, 8), 8)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert math.isclose(float(straight[0].rewiring.progress), 0.5)


@pytest.mark.parametrize("level", ["edge", "group"])
def test_train_step_zeroes_the_optimizer_state_of_regrown_weights(level):
    from brickwork.train.loop import train_step

    layer = GroupLinear(
        16,
        16,
        groups=4,
        density=0.5,
        edge_density=0.5 if level == "edge" else 1.0,
        rewiring=Rewiring("random", level, interval=3, fraction=0.5),
    )
    model = nn.Sequential(layer, nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    for step in range(3):  # the third step is an update
        before = (layer.sources.clone(), layer.mask.clone() if layer.mask is not None else None)
        train_step(
            model,
            torch.randn(8, 16, generator=gen),
            torch.randint(0, 3, (8,), generator=gen),
            F.cross_entropy,
            opt,
            progress=(step + 1) / 10,
        )
    state = opt.state[layer.weight]
    if level == "edge":
        grown = layer.mask & ~before[1]
    else:
        moved = layer.sources != before[0]
        grown = moved[:, None, :, None].expand(4, 4, 2, 4).reshape(layer.weight.shape)  # (G, b_out, k, b_in)
    assert grown.any() and layer.take_regrown() == []  # taken once, by the step
    for name in ("exp_avg", "exp_avg_sq"):
        assert (state[name][grown] == 0).all(), name
        live = ~grown if layer.mask is None else layer.mask & ~grown
        assert (state[name][live] != 0).any(), name  # only the regrown positions were reset


def test_rigl_captures_the_dense_and_edge_gradients_of_the_update_step_only():
    """What data parallelism averages over the ranks: on the step before an update, RigL's dense
    (d_out, d_in) gradient and its edge gradient, which at every stored position (masked or not) is
    the dense gradient there; on other steps, nothing. Summed over two forwards of one step."""
    torch.manual_seed(0)
    policy = Rewiring("gradient", "both", interval=2, fraction=0.25)
    layer = GroupLinear(8, 8, groups=2, density=0.5, edge_density=0.5, in_perm=torch.randperm(8), rewiring=policy)
    layer = layer.double()
    x = torch.randn(4, 8, dtype=torch.float64)
    layer(x).square().sum().backward()
    assert policy.batch_gradients() == []  # step 1: no update due after it
    layer.after_step()
    (layer(x).square().sum() + layer(2 * x).sum()).backward()
    dense, edge = policy.batch_gradients()
    w = layer.dense_weight().clone().requires_grad_(True)
    (F.linear(x, w, layer.bias).square().sum() + F.linear(2 * x, w, layer.bias).sum()).backward()
    torch.testing.assert_close(dense, w.grad, rtol=0, atol=1e-12)
    rows = layer.plan().fwd_rows.view(2, 1, -1).expand(2, 4, -1)
    torch.testing.assert_close(edge, w.grad.view(2, 4, 8).gather(2, rows), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("level", "message"),
    [
        ("group", "rewiring: no gradient was captured on the update step (was backward run?)"),
        ("edge", "rewiring: no weight gradient was captured on the update step"),
    ],
)
def test_a_rigl_update_without_a_backward_says_so(level, message):
    layer = quarter_dense_16(Rewiring("gradient", level, interval=1, fraction=0.25))
    layer(torch.randn(4, 16))  # the update step's forward, but no backward
    with pytest.raises(RuntimeError) as err:
        layer.after_step()
    assert str(err.value) == message


def test_hebbian_edge_statistics_are_gathered_on_the_window_before_each_update_only():
    """interval 4, window 2, stop 0.5: the edge window holds the forwards of steps 3, 4 (reset by
    the update after step 4), 7, 8, ...; none once progress reaches ``stop``."""
    torch.manual_seed(0)
    policy = Rewiring("hebbian", "edge", interval=4, fraction=0.25, window=2, stop=0.5)
    layer = GroupLinear(8, 8, groups=2, density=0.25, edge_density=0.5, rewiring=policy)
    rows = []
    for step in range(1, 13):
        policy.set_progress(0.5 if step >= 11 else step / 24)  # steps 11 and 12: at ``stop``
        layer(torch.randn(3, 8))
        assert policy.stats is not None
        rows.append(int(policy.stats.e_n))
        layer.after_step()
    assert rows == [0, 0, 3, 6, 0, 0, 3, 6, 0, 0, 0, 0]


@pytest.mark.parametrize("regrow", ["hebbian", "gradient"])
def test_every_moved_block_goes_to_the_input_group_its_score_ranks_first(regrow):
    """Four output groups each read one of 16 input groups; fraction 1 moves all four. Input group
    8 + o carries output group o's signal: a copy of its input (Hebbian) or what its loss gradient is
    made of (RigL), so each block must land there (random regrowth would match 1 in 15^4)."""
    torch.manual_seed(0)
    policy = Rewiring(regrow, "group", interval=1, fraction=1.0)
    layer = GroupLinear(64, 16, groups=4, groups_in=16, connectivity=torch.arange(4)[:, None], rewiring=policy)
    gen = torch.Generator().manual_seed(0)
    if regrow == "hebbian":
        with torch.no_grad():
            layer.weight.fill_(1.0)  # output group o's mean activity is that of input group o
        for _ in range(3):
            x = torch.randn(64, 64, generator=gen)
            x[:, 32:48] = x[:, 0:16]  # input groups 8..11 copy groups 0..3
            layer(x)
    else:
        x = torch.randn(256, 64, generator=gen)
        signal = x.view(256, 16, 4)[:, 8:12].sum(-1)  # (B, 4): dL/dy of output group o is input group 8 + o's sum
        (layer(x).view(256, 4, 4) * signal[:, :, None]).sum().backward()
    layer.after_step()
    assert layer.sources.tolist() == [[8], [9], [10], [11]]
    assert policy.record == {"step": 1, "fraction": 1.0, "edges_moved": 0, "blocks_moved": 4}


def test_counters_records_and_regrown_positions_of_each_level():
    """An edge-level update moves no block and a group-level one no edge; the record (collected
    model-wide, absent before the first update) says what moved; the regrown positions are taken
    once, and an update that moves nothing (fraction 0) or a static layer has none."""
    from brickwork.nn.records import collect_records

    torch.manual_seed(0)
    edges = GroupLinear(16, 16, groups=4, density=0.25, edge_density=0.5, rewiring=Rewiring("random", "edge", 1))
    assert collect_records(edges) == {}
    before = edges.mask.clone()
    edges.after_step()
    n = round(0.3 * int(before.sum()))
    assert (int(edges.rewiring.edges_moved), int(edges.rewiring.blocks_moved)) == (n, 0)
    assert collect_records(edges) == {"rewiring": {"step": 1, "fraction": 0.3, "edges_moved": n, "blocks_moved": 0}}
    ((param, grown),) = edges.take_regrown()
    assert param is edges.weight and torch.equal(grown, edges.mask & ~before) and edges.take_regrown() == []
    blocks = GroupLinear(16, 16, groups=4, density=0.5, rewiring=Rewiring("random", "group", 1, fraction=0.25))
    blocks.after_step()
    assert (int(blocks.rewiring.edges_moved), int(blocks.rewiring.blocks_moved)) == (0, 2)
    still = GroupLinear(16, 16, groups=4, density=0.5, rewiring=Rewiring("random", "group", 1, fraction=0.0))
    still.after_step()
    assert still.rewiring.record == {"step": 1, "fraction": 0.0, "edges_moved": 0, "blocks_moved": 0}
    assert still.take_regrown() == [] and GroupLinear(16, 16, groups=4, density=0.5).take_regrown() == []


def test_blocks_are_dropped_by_the_rms_of_their_active_weights():
    """Output group 0's first block has one active weight 0.35 (RMS 0.35), its second four of 0.3
    (RMS 0.3, but the larger sum of squares): the RMS drops the second one."""
    layer = GroupLinear(
        16,
        4,
        groups=2,
        groups_in=4,
        density=0.25,
        edge_density=0.5,
        rewiring=Rewiring("random", "group", 1, fraction=0.25),  # one of 4 blocks moves
    )
    with torch.no_grad():
        layer.sources.copy_(torch.tensor([[0, 1], [2, 3]]))
        layer.mask.zero_()
        layer.weight.zero_()
        layer.mask[0, 0, 0], layer.weight[0, 0, 0] = True, 0.35  # slot 0 of output group 0 (columns 0-3)
        layer.mask[0, :, 4:6], layer.weight[0, :, 4:6] = True, 0.3  # slot 1 (columns 4-7)
        layer.mask[1], layer.weight[1] = True, 1.0
    layer.after_step()
    assert int(layer.rewiring.blocks_moved) == 1 and layer.sources[1].tolist() == [2, 3]
    assert int(layer.sources[0, 0]) == 0 and int(layer.sources[0, 1]) in (2, 3)
