"""MoE layer: fast path == generic path, capacity and dropping, shared experts, records, FLOPs."""

from __future__ import annotations

import math

import pydantic
import pytest
import torch
from torch import Tensor, nn

from brickwork.analysis.compute import FlopMeter
from brickwork.errors import ConfigError
from brickwork.nn.attention import MultiHeadAttention
from brickwork.nn.ffn import FeedForward
from brickwork.nn.moe import GatedExpert, MoE, moe_ffn
from brickwork.nn.records import collect_aux_losses, collect_records, weighted_aux_loss
from brickwork.nn.routing import (
    DenseToSparseRouter,
    ExpertChoiceRouter,
    ExpertList,
    GroupedFFNExperts,
    HashRouter,
    MoESettings,
    Routing,
    RoutingRecord,
    TopKRouter,
    balance_token_hash,
    build_router,
    expert_capacity,
    plan_dispatch,
    token_choice_routing,
)
from brickwork.nn.transformer import TransformerBlock
from brickwork.ops.permutation import permutation_spec, permute, random_perms
from brickwork.registry import REGISTRY, register

BACKENDS = ["split", "bmm"] + (["grouped_mm"] if hasattr(torch, "_grouped_mm") else [])


class FixedRouter(nn.Module):
    """Routes token i to experts ``table[i]`` with weights ``w[i]`` (for exact capacity tests)."""

    def __init__(self, table: list[list[int]], weights: list[list[float]], num_experts: int) -> None:
        super().__init__()
        self.table = torch.tensor(table)
        self.w = torch.tensor(weights)
        self.num_experts = num_experts

    def forward(self, x: Tensor) -> Routing:
        return token_choice_routing(self.table, self.w.to(x.dtype), self.num_experts)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("glu,bias,dim", [(True, False, 8), (False, True, 8), (True, True, 6)])
def test_fast_path_equals_generic_path(backend: str, glu: bool, bias: bool, dim: int) -> None:
    if backend == "grouped_mm" and dim % 4:
        pytest.skip("grouped_mm needs 16-byte rows; auto falls back to split there")
    torch.manual_seed(0)
    e, hidden = 4, 12
    fast_experts = GroupedFFNExperts(e, dim, hidden, act="silu", glu=glu, bias=bias, backend=backend)  # type: ignore[arg-type]
    generic_experts = [fast_experts.to_feed_forward(i) for i in range(e)]
    router = TopKRouter(dim, e, top_k=2)
    fast = MoE(fast_experts, router)
    generic = MoE(generic_experts, router)
    x = torch.randn(3, 5, dim, requires_grad=True)
    g = torch.randn(3, 5, dim)

    y_fast = fast(x)
    y_gen = generic(x)
    torch.testing.assert_close(y_fast, y_gen)
    (gx_fast,) = torch.autograd.grad(y_fast, x, g, retain_graph=True)
    (gx_gen,) = torch.autograd.grad(y_gen, x, g, retain_graph=True)
    torch.testing.assert_close(gx_fast, gx_gen)

    fast_params = dict(fast_experts.named_parameters())
    grads_fast = torch.autograd.grad(y_fast, list(fast_params.values()) + list(router.parameters()), g)
    grads_gen = torch.autograd.grad(
        y_gen, [p for m in generic_experts for p in m.parameters()] + list(router.parameters()), g
    )
    gf = dict(zip(list(fast_params) + ["router"], grads_fast, strict=True))
    router_grad_gen = grads_gen[-1]
    torch.testing.assert_close(gf["router"], router_grad_gen)
    # map the stacked gradients back to per-expert FeedForward layout
    for i, m in enumerate(generic_experts):
        pg = dict(zip([n for n, _ in m.named_parameters()], grads_gen[i * len(list(m.parameters())) :], strict=False))
        up = gf["w_in"][i, :, :hidden].t()
        torch.testing.assert_close(up, pg["up.weight"])
        if glu:
            torch.testing.assert_close(gf["w_in"][i, :, hidden:].t(), pg["gate.weight"])
        torch.testing.assert_close(gf["w_out"][i].t(), pg["down.weight"])
        if bias:
            torch.testing.assert_close(gf["b_out"][i], pg["down.bias"])


def test_from_feed_forward_round_trip() -> None:
    torch.manual_seed(0)
    ffs = [FeedForward(8, 12, act="gelu", glu=True) for _ in range(3)]
    bank = GroupedFFNExperts.from_feed_forward(ffs)
    x = torch.randn(5, 8)
    for i, f in enumerate(ffs):
        torch.testing.assert_close(bank.to_feed_forward(i)(x), f(x))
        counts = torch.zeros(3, dtype=torch.long)
        counts[i] = 5
        torch.testing.assert_close(bank(x, counts), f(x))


def test_top1_moe_matches_per_token_reference() -> None:
    torch.manual_seed(0)
    moe = moe_ffn(8, 16, num_experts=4, routing=MoESettings(top_k=2), act="silu", glu=True).eval()
    x = torch.randn(10, 8)
    y = moe(x)
    routing = moe.router(x)
    ref = torch.zeros_like(x)
    for t, e, w in zip(routing.token_idx.tolist(), routing.expert_idx.tolist(), routing.weights, strict=True):
        ref[t] += w * moe.experts.to_feed_forward(e)(x[t : t + 1])[0]
    torch.testing.assert_close(y, ref)


def test_capacity_drops_overflow_and_dropped_tokens_get_zero() -> None:
    # 6 tokens, 3 experts, top-1: tokens 0-3 -> expert 0, 4 -> expert 1, 5 -> expert 2.
    table = [[0], [0], [0], [0], [1], [2]]
    router = FixedRouter(table, [[1.0]] * 6, 3)
    experts = [nn.Linear(4, 4) for _ in range(3)]
    moe = MoE(experts, router, capacity_factor=1.0, priority="position")  # C = ceil(6 / 3) = 2
    x = torch.randn(6, 4)
    y = moe(x)
    rec = moe.record
    assert rec is not None and rec.capacity == 2
    assert rec.kept.tolist() == [True, True, False, False, True, True]
    assert rec.load.tolist() == [2, 1, 1] and rec.dropped == 2 and rec.unrouted_tokens == 2
    assert rec.drop_rate == pytest.approx(2 / 6)
    torch.testing.assert_close(y[2:4], torch.zeros(2, 4))  # dropped: zero (the residual carries them)
    torch.testing.assert_close(y[0], experts[0](x[0]))
    # dropless: nothing dropped
    dropless = MoE(experts, router)
    dropless(x)
    assert dropless.record is not None and dropless.record.dropped == 0


def test_capacity_priorities() -> None:
    # top-2, 4 tokens, 2 experts; every token picks (0, 1) or (1, 0); C = ceil(0.5 * 8 / 2) = 2.
    table = [[1, 0], [0, 1], [0, 1], [0, 1]]
    weights = [[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.7, 0.3]]
    x = torch.randn(4, 4)
    experts = [nn.Identity(), nn.Identity()]
    kept = {}
    for priority in ("position", "slot", "weight"):
        moe = MoE(experts, FixedRouter(table, weights, 2), capacity_factor=0.5, priority=priority)
        moe(x)
        assert moe.record is not None
        kept[priority] = moe.record.kept.view(4, 2).tolist()
    # position: earlier tokens first (expert 0: tokens 0 (slot 2), 1; expert 1: tokens 0, 1)
    assert kept["position"] == [[True, True], [True, True], [False, False], [False, False]]
    # slot: first choices first (expert 0 first choices: tokens 1, 2; expert 1: token 0 then the
    # second choice of token 1)
    assert kept["slot"] == [[True, False], [True, True], [True, False], [False, False]]
    # weight: largest weights first (expert 0: 0.7 (t3), 0.6 (t1); expert 1: 0.9 (t0), 0.8 (t2))
    assert kept["weight"] == [[True, False], [True, False], [False, True], [True, False]]


def test_drop_in_for_feed_forward_in_transformer_block() -> None:
    torch.manual_seed(0)
    moe = moe_ffn(8, 12, num_experts=4, routing=MoESettings(capacity_factor=1.25))
    block = TransformerBlock(8, MultiHeadAttention(8, 2), moe)
    x = torch.randn(2, 6, 8)
    y = block(x)
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_shared_and_gated_shared_expert() -> None:
    torch.manual_seed(0)
    shared = FeedForward(8, 12)
    router = TopKRouter(8, 4)
    bank = GroupedFFNExperts(4, 8, 12)
    x = torch.randn(7, 8)
    plain = MoE(bank, router)(x)
    torch.testing.assert_close(MoE(bank, router, shared=shared)(x), plain + shared(x))
    gated = GatedExpert(shared, 8)
    expected = plain + torch.sigmoid(gated.gate(x)) * shared(x)
    torch.testing.assert_close(MoE(bank, router, shared=gated)(x), expected)
    m = moe_ffn(8, 12, 4, shared_hidden=16, shared_gated=True)
    assert isinstance(m.shared, GatedExpert)


def test_records_and_aux_losses_collected_model_wide() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(moe_ffn(8, 12, 4), nn.GELU(), moe_ffn(8, 12, 4, MoESettings(router="expert_choice"))).train()
    x = torch.randn(2, 5, 8)
    model(x)
    records = collect_records(model)
    assert set(records) == {"0", "2"} and all(isinstance(r, RoutingRecord) for r in records.values())
    assert records["0"].leading_shape == (2, 5) and int(records["0"].load.sum()) == 20
    losses = collect_aux_losses(model)
    assert set(losses) == {"load_balance", "z_loss"}
    torch.testing.assert_close(losses["z_loss"], model[0].aux_losses["z_loss"] + model[2].aux_losses["z_loss"])
    total = weighted_aux_loss(model, {"load_balance": 0.01, "z_loss": 0.001})
    assert total is not None
    torch.testing.assert_close(total, 0.01 * losses["load_balance"] + 0.001 * losses["z_loss"])
    model.eval()
    model(x)
    assert collect_aux_losses(model) == {}  # fresh every forward; none in eval


@pytest.mark.parametrize("generic", [False, True])
def test_counted_flops_equal_active_flops(generic: bool) -> None:
    torch.manual_seed(0)
    n, d, h, e, k = 12, 8, 16, 4, 2
    bank = GroupedFFNExperts(e, d, h, act="silu", glu=True)
    experts = [bank.to_feed_forward(i) for i in range(e)] if generic else bank
    moe = MoE(experts, TopKRouter(d, e, top_k=k)).eval()
    meter = FlopMeter()
    with meter, torch.no_grad():
        moe(torch.randn(n, d))
    expert_flops = 2 * d * (2 * h) + 2 * h * d  # fused gate/up projection, then down
    router_flops = 2 * d * e
    assert meter.total == n * k * expert_flops + n * router_flops


def test_counted_flops_shrink_with_dropped_tokens() -> None:
    router = FixedRouter([[0]] * 6, [[1.0]] * 6, 3)
    bank = GroupedFFNExperts(3, 8, 12)
    meter = FlopMeter()
    with meter, torch.no_grad():
        MoE(bank, router, capacity_factor=1.0)(torch.randn(6, 8))  # C = 2 of the 6 tokens run
    assert meter.total == 2 * (2 * 8 * 12 * 2)


# Routers whose combine weights are constant 1 (MoEfication's): the task loss gives their own
# parameters no gradient (the MLP router is trained apart, by ops.moefy_router).
NO_TASK_GRADIENT = {"mlp"}


@pytest.mark.parametrize("router", REGISTRY.names("router"))
def test_moe_ffn_smoke_every_registered_router(router: str) -> None:
    torch.manual_seed(0)
    moe = moe_ffn(8, 12, 4, MoESettings(router=router), glu=True, act="silu", bias=True).train()
    x = torch.randn(2, 5, 8)
    if getattr(moe.router, "needs_token_ids", False):  # token-id hash routers read the input ids
        ids = torch.randint(0, 50, (2, 5))
        balance_token_hash(moe, ids)  # the frequency table (a no-op for the random one)
        moe.router.set_token_ids(ids)
    y = moe(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    (y.square().mean() + sum(moe.aux_losses.values())).backward()
    for name, p in moe.named_parameters():
        if router in NO_TASK_GRADIENT and name.startswith("router."):
            continue
        assert p.grad is not None, name


def test_moe_ffn_resolves_routers_by_registry_name_only() -> None:
    with pytest.raises(ConfigError, match="unknown router name.*did you mean 'topk'"):
        moe_ffn(8, 12, 4, MoESettings(router="topkk"))

    @register("router", "test_fixed")
    class Fixed(nn.Module):  # a router of one's own becomes a name moe_ffn accepts by registering it
        def __init__(self, dim: int, num_experts: int, top_k: int = 2) -> None:
            super().__init__()
            self.top_k = top_k

        def forward(self, x: Tensor) -> Routing:
            n = x.reshape(-1, x.shape[-1]).shape[0]
            return token_choice_routing(torch.arange(self.top_k).repeat(n, 1), torch.ones(n, self.top_k), 4)

    try:
        moe = moe_ffn(8, 12, 4, MoESettings(router="test_fixed", top_k=3))
        assert isinstance(moe.router, Fixed) and moe.router.top_k == 3
        assert moe(torch.randn(5, 8)).shape == (5, 8)
    finally:
        REGISTRY._entries["router"].pop("test_fixed")


def test_router_settings_reach_the_router() -> None:
    topk = moe_ffn(8, 12, 4, MoESettings(top_k=3, balance="aux_free", balance_rate=0.01, noise="jitter")).router
    assert (topk.top_k, topk.noise, topk.load_balance) == (3, "jitter", False)
    assert topk.selection_bias is not None and topk.selection_bias.rate == 0.01
    sig = moe_ffn(8, 12, 4, MoESettings(router="sigmoid", balance="none")).router
    assert sig.gate == "sigmoid_topk_renorm" and not sig.load_balance and sig.selection_bias is None
    ec = moe_ffn(8, 12, 4, MoESettings(router="expert_choice", top_k=3)).router
    assert ec.capacity_factor == 3.0
    assert moe_ffn(8, 12, 4, MoESettings(router="hash", top_k=3)).router.top_k == 3
    dts = moe_ffn(8, 12, 4, MoESettings(router="dense_to_sparse", balance="none")).router
    assert (dts.activation, dts.gumbel, dts.load_balance) == ("none", True, False)
    act = moe_ffn(8, 12, 4, MoESettings(router="activation_dense_to_sparse")).router
    assert (act.activation, act.gumbel, act.load_balance) == ("tanh", False, True)


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"router": "dense_to_sparse", "top_k": 1}, "top_k"),  # chooses by threshold, not top-k
        ({"router": "activation_dense_to_sparse", "top_k": 4}, "top_k"),
        ({"router": "expert_choice", "noise": "gaussian"}, "noise"),
        ({"router": "hash", "balance": "aux_free"}, "balance"),
        ({"router": "dense_to_sparse", "balance": "aux_free"}, "balance"),
        ({"router": "topk", "balance_rate": 0.01}, "balance_rate"),  # the rate of aux_free only
    ],
)
def test_a_setting_the_router_ignores_is_rejected(settings: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{key}: .*(does not use|aux_free)"):
        moe_ffn(8, 12, 4, MoESettings(**settings))  # type: ignore[arg-type]


def test_settings_reject_bad_values() -> None:
    with pytest.raises(pydantic.ValidationError):
        MoESettings(top_k=0)
    with pytest.raises(pydantic.ValidationError):
        MoESettings(balance="aux_los")  # type: ignore[arg-type]


def test_router_expert_count_mismatch_is_an_error() -> None:
    moe = MoE(GroupedFFNExperts(3, 8, 8), TopKRouter(8, 4))
    with pytest.raises(ValueError, match="4 experts"):
        moe(torch.randn(2, 8))


def test_expert_capacity_is_the_ceiling_and_at_least_one() -> None:
    # ceil(c * A / E): 3.125 -> 4, 7/6 -> 2, 2.5 -> 3, 0.75 -> 1; no assignments still leave room for one
    cases = {(10, 4, 1.25): 4, (7, 3, 0.5): 2, (10, 4, 1.0): 3, (3, 4, 1.0): 1, (0, 4, 1.0): 1, (8, 2, 1.0): 4}
    assert {args: expert_capacity(*args) for args in cases} == cases


def test_weight_priority_breaks_ties_by_position() -> None:
    """Equal weights keep token order (a stable sort): of 20 equal-weight tokens sent to expert 0
    with room for 5, tokens 0-4 are kept. An unstable sort of 20 ties permutes them on the CPU."""
    router = FixedRouter([[0]] * 20, [[0.5]] * 20, 2)
    plan = plan_dispatch(router(torch.zeros(20, 4)), capacity_factor=0.5, priority="weight")  # C = ceil(5) = 5
    assert plan.capacity == 5
    assert plan.order.tolist() == [0, 1, 2, 3, 4] and plan.kept.tolist() == [True] * 5 + [False] * 15
    # dropless too: each expert's rows stay in token order (40 assignments, 2 experts, many ties)
    spread = FixedRouter([[t % 2] for t in range(40)], [[0.5]] * 40, 2)
    dropless = plan_dispatch(spread(torch.zeros(40, 4)))
    assert dropless.order.tolist() == list(range(0, 40, 2)) + list(range(1, 40, 2))


@pytest.mark.parametrize("capacity_factor", [None, 0.75])
@pytest.mark.parametrize("priority", ["position", "slot", "weight"])
def test_dispatch_makes_its_tensors_on_the_routing_device(capacity_factor: float | None, priority: str) -> None:
    """The plan is built on the device of the routing, whatever the default device is: under a
    meta default device, a tensor made without ``device=`` would be meta and the indexing fail."""
    table = [[0, 1], [1, 2], [0, 2], [0, 1], [2, 1]]
    weights = [[0.6, 0.4], [0.7, 0.3], [0.5, 0.5], [0.9, 0.1], [0.8, 0.2]]
    routing = FixedRouter(table, weights, 3)(torch.zeros(5, 4))
    expected = plan_dispatch(routing, capacity_factor, priority)  # type: ignore[arg-type]
    with torch.device("meta"):
        plan = plan_dispatch(routing, capacity_factor, priority)  # type: ignore[arg-type]
    assert plan.order.device.type == plan.kept.device.type == "cpu"
    assert torch.equal(plan.order, expected.order) and torch.equal(plan.kept, expected.kept)


@pytest.mark.parametrize(("glu", "bias"), [(False, False), (False, True), (True, False), (True, True)])
def test_from_feed_forward_keeps_every_form_dtype_and_backend(glu: bool, bias: bool) -> None:
    """Stacking E FeedForwards keeps the gated / biased form, the dtype and the backend asked for:
    each expert of the bank equals its FeedForward in float64 (1e-12), and converts back to it."""
    torch.manual_seed(0)
    ffs = [FeedForward(6, 5, act="silu", glu=glu, bias=bias, dtype=torch.float64) for _ in range(3)]
    bank = GroupedFFNExperts.from_feed_forward(ffs, backend="split")
    assert (bank.glu, bank.b_in is not None, bank.b_out is not None, bank.backend) == (glu, bias, bias, "split")
    assert bank.w_in.dtype == torch.float64
    x = torch.randn(4, 6, dtype=torch.float64)
    for i, f in enumerate(ffs):
        counts = torch.zeros(3, dtype=torch.long)
        counts[i] = 4
        torch.testing.assert_close(bank(x, counts), f(x), rtol=0, atol=1e-12)
        back = dict(bank.to_feed_forward(i).named_parameters())
        assert back.keys() == dict(f.named_parameters()).keys()
        assert all(torch.equal(back[n], p) for n, p in f.named_parameters())


def test_from_feed_forward_of_one_expert_on_the_meta_device_and_refusals() -> None:
    one = GroupedFFNExperts.from_feed_forward([FeedForward(6, 5, device="meta")])
    assert one.num_experts == 1 and one.w_in.device.type == "meta"
    assert all(p.device.type == "meta" for p in one.to_feed_forward(0).parameters())
    for other in (FeedForward(6, 4), FeedForward(6, 5, glu=True), FeedForward(6, 5, act="relu")):
        with pytest.raises(
            ValueError, match=r"^GroupedFFNExperts\.from_feed_forward: experts differ in shape, act or glu$"
        ):
            GroupedFFNExperts.from_feed_forward([FeedForward(6, 5), other])


def test_gated_expert_gate_is_one_bias_free_scalar_per_token() -> None:
    """Qwen-MoE's shared-expert gate: ``sigmoid(x . w)``, no bias, in the dtype and on the device asked for."""
    torch.manual_seed(0)
    expert = FeedForward(6, 5, dtype=torch.float64)
    gated = GatedExpert(expert, 6, dtype=torch.float64)
    assert gated.gate.bias is None and gated.gate.weight.shape == (1, 6) and gated.gate.weight.dtype == torch.float64
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    expected = torch.sigmoid(x @ gated.gate.weight.detach()[0])[..., None] * expert(x)
    torch.testing.assert_close(gated(x), expected, rtol=0, atol=1e-12)
    assert GatedExpert(FeedForward(6, 5), 6, device="meta").gate.weight.device.type == "meta"


def _axes(*specs: str) -> set[str]:
    return set(specs)


def _symmetry_cases() -> dict[str, tuple[nn.Module, list[set[str]]]]:
    """MoEs between two linear layers (a model's own input and output are fixed), float64, with the
    free permutations each must declare, as the sets of axes they move: ``tensor:dim``, with
    ``:offset`` and ``b`` (batched over the experts axis) for an expert's hidden units."""
    torch.manual_seed(0)
    d, e, h, hs = 6, 4, 5, 7
    cases: dict[str, tuple[nn.Module, list[set[str]]]] = {}

    router = TopKRouter(d, e, bias=True, noise="learned", balance_rate=0.01)
    assert router.selection_bias is not None
    router.selection_bias.bias.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]))  # moves the choice: must follow the experts
    bank = GroupedFFNExperts(e, d, h, act="silu", glu=True, bias=True)
    moe = MoE(bank, router, shared=GatedExpert(FeedForward(d, hs), d))
    cases["grouped_glu_topk_gated_shared"] = (
        nn.Sequential(nn.Linear(d, d), moe, nn.Linear(d, d)),
        [
            _axes("0.weight:0", "0.bias:0", "1.router.proj.weight:1", "1.router.noise_proj.weight:1",
                  "1.experts.w_in:1", "1.shared.gate.weight:1", "1.shared.expert.up.weight:1"),
            _axes("1.experts.w_out:2", "1.experts.b_out:1", "1.shared.expert.down.weight:0",
                  "1.shared.expert.down.bias:0", "2.weight:1"),
            _axes("1.router.proj.weight:0", "1.router.proj.bias:0", "1.router.noise_proj.weight:0",
                  "1.router.selection_bias.bias:0", "1.router.selection_bias.pending_load:0",
                  "1.experts.w_in:0", "1.experts.w_out:0", "1.experts.b_in:0", "1.experts.b_out:0"),
            _axes("1.experts.w_in:2:0b", "1.experts.w_in:2:5b", "1.experts.w_out:1:0b",
                  "1.experts.b_in:1:0b", "1.experts.b_in:1:5b"),
            _axes("1.shared.expert.up.weight:0", "1.shared.expert.up.bias:0", "1.shared.expert.down.weight:1"),
        ],
    )  # fmt: skip

    bank = GroupedFFNExperts(e, d, h, act="gelu")
    for name, r in (
        ("expert_choice", ExpertChoiceRouter(d, e, bias=True)),
        ("dense_to_sparse", DenseToSparseRouter(d, e)),
    ):
        cases[name] = (
            nn.Sequential(nn.Linear(d, d), MoE(bank, r), nn.Linear(d, d)),
            [
                _axes("0.weight:0", "0.bias:0", "1.router.proj.weight:1", "1.experts.w_in:1"),
                _axes("1.experts.w_out:2", "2.weight:1"),
                _axes("1.router.proj.weight:0", "1.router.proj.bias:0", "1.experts.w_in:0", "1.experts.w_out:0"),
                _axes("1.experts.w_in:2:0b", "1.experts.w_out:1:0b"),
            ],
        )

    # A list of experts keeps its order (it offers no expert port); each expert's hidden units move.
    experts = [FeedForward(d, h) for _ in range(e)]
    expected = [
        _axes("0.weight:0", "0.bias:0", "1.router.proj.weight:1", "1.shared.up.weight:1",
              *(f"1.experts.{i}.up.weight:1" for i in range(e))),
        _axes("1.shared.down.weight:0", "1.shared.down.bias:0", "2.weight:1",
              *(f"1.experts.{i}.down.{t}:0" for i in range(e) for t in ("weight", "bias"))),
        _axes("1.shared.up.weight:0", "1.shared.up.bias:0", "1.shared.down.weight:1"),
        *(_axes(f"1.experts.{i}.up.weight:0", f"1.experts.{i}.up.bias:0", f"1.experts.{i}.down.weight:1")
          for i in range(e)),
    ]  # fmt: skip
    moe = MoE(experts, TopKRouter(d, e), shared=FeedForward(d, hs))
    cases["expert_list_shared"] = (nn.Sequential(nn.Linear(d, d), moe, nn.Linear(d, d)), expected)

    # A hash router is fixed: the layer's input and the expert order stay; the output and the
    # hidden units inside each expert still move.
    bank = GroupedFFNExperts(e, d, h)
    cases["hash"] = (
        nn.Sequential(nn.Linear(d, d), MoE(bank, HashRouter(d, e)), nn.Linear(d, d)),
        [_axes("1.experts.w_out:2", "2.weight:1"), _axes("1.experts.w_in:2:0b", "1.experts.w_out:1:0b")],
    )
    return {k: (m.double().eval(), want) for k, (m, want) in cases.items()}


@pytest.mark.parametrize("case", list(_symmetry_cases()))
def test_declared_permutations_move_what_they_should_and_keep_the_function(case: str) -> None:
    """The MoE's declared symmetry (with its bank's, router's and shared expert's) gives exactly
    these free permutations, and a random one of them applied to the model leaves its function
    unchanged: the router rows and the selection bias follow the expert order, a fixed router
    fixes the layer's input."""
    model, expected = _symmetry_cases()[case]
    spec = permutation_spec(model)
    moved = [
        {f"{a.tensor}:{a.dim}" + (f":{a.offset}b" if a.batch_dim is not None else "") for a in spec.axes if a.perm == n}
        for n in spec.free()
    ]
    # (with a fixed router the MoE's own expert permutation is bound to nothing and moves no axis)
    assert sorted(sorted(m) for m in moved if m) == sorted(map(sorted, expected))
    other = permute(model, random_perms(spec, torch.Generator().manual_seed(1)), spec).eval()
    assert any(
        not torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True)
    )
    x = torch.randn(3, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x), rtol=0, atol=1e-12)


def test_extra_reprs_show_the_settings() -> None:
    bank = GroupedFFNExperts(4, 6, 5, act="silu", glu=True, bias=True, backend="split")
    assert bank.extra_repr() == "num_experts=4, dim=6, hidden=5, act=silu, glu=True, bias=True, backend=split"
    assert MoE(bank, TopKRouter(6, 4)).extra_repr() == "num_experts=4, dropless, priority=slot"
    capped = MoE(bank, TopKRouter(6, 4), capacity_factor=1.25, priority="weight")
    assert capped.extra_repr() == "num_experts=4, capacity_factor=1.25, priority=weight"


def test_routing_record_by_hand() -> None:
    """A record of 3 tokens, 4 assignments (one dropped), hand-made probabilities: every derived
    figure worked out by hand, and the record holds no graph."""
    probs = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.25, 0.25, 0.5]], requires_grad=True)
    weights = torch.tensor([0.5, 0.5, 1.0, 0.5], requires_grad=True)
    routing = Routing(torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 0, 2]), weights, 3, 3, probs=probs)
    assert routing.num_assignments == 4
    kept = torch.tensor([True, True, False, True])
    rec = RoutingRecord.of(routing, (1, 3), kept, torch.tensor([1, 1, 1]), capacity=1)
    assert (rec.num_tokens, rec.num_experts, rec.leading_shape, rec.capacity) == (3, 3, (1, 3), 1)
    assert not rec.weights.requires_grad and rec.probs is not None and not rec.probs.requires_grad
    assert rec.dropped == 1 and rec.drop_rate == 0.25 and rec.unrouted_tokens == 1  # token 1 lost its only one
    assert torch.equal(rec.load_fraction, torch.full((3,), 1 / 3, dtype=torch.float64))
    # entropies ln 2, 0 and 1.5 ln 2 (0 log 0 = 0): mean 2.5 ln 2 / 3
    assert rec.entropy is not None and abs(rec.entropy - 2.5 * math.log(2.0) / 3) < 1e-12
    empty = RoutingRecord.of(
        Routing(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0), 2, 3),
        (2,), torch.zeros(0, dtype=torch.bool), torch.zeros(3, dtype=torch.long),
    )  # fmt: skip
    assert (empty.drop_rate, empty.unrouted_tokens, empty.entropy, empty.capacity) == (0.0, 2, None, None)
    assert torch.equal(empty.load_fraction, torch.zeros(3, dtype=torch.float64))


def test_token_choice_routing_is_token_major() -> None:
    top = torch.tensor([[2, 0], [1, 2], [0, 1]])
    w = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.9, 0.1]])
    r = token_choice_routing(top, w, 3, aux_losses={"z": torch.tensor(1.0)})
    assert r.token_idx.tolist() == [0, 0, 1, 1, 2, 2] and r.expert_idx.tolist() == [2, 0, 1, 2, 0, 1]
    assert r.weights.tolist() == pytest.approx([0.7, 0.3, 0.6, 0.4, 0.9, 0.1])
    assert (r.num_tokens, r.num_experts, r.top_k, set(r.aux_losses), r.aux_sums) == (3, 3, 2, {"z"}, {})
    with torch.device("meta"):  # made on the choices' device, not the default one
        assert token_choice_routing(top, w, 3).token_idx.device.type == "cpu"


def test_router_kwargs_match_each_routers_own_arguments() -> None:
    """Each setting reaches a router only through an argument of that name; expert choice takes
    top_k as its capacity factor (a float)."""
    s = MoESettings(top_k=3, balance="aux_free", balance_rate=0.01, noise="jitter")
    token_choice = {"top_k": 3, "noise": "jitter", "load_balance": False, "balance_rate": 0.01}
    expected = {"topk": token_choice, "sigmoid": token_choice, "noisy_topk": {"top_k": 3, "load_balance": False},
                "expert_choice": {"capacity_factor": 3.0}, "hash": {"top_k": 3}, "emoe": {"top_k": 3},
                "dense_to_sparse": {"load_balance": False}}  # fmt: skip
    for name, kw in expected.items():
        got = s.router_kwargs(REGISTRY.get("router", name))
        assert got == kw and type(got.get("capacity_factor", 0.0)) is float, name
    plain = MoESettings().router_kwargs(REGISTRY.get("router", "topk"))
    assert plain == {"top_k": 2, "noise": "none", "load_balance": True, "balance_rate": 0.0}


def test_build_router_passes_the_bank_device_and_dtype_only_where_taken() -> None:
    bank = GroupedFFNExperts(4, 8, 6, glu=True)
    emoe = build_router(MoESettings(router="emoe"), 8, 4, bank=bank, device="meta", dtype=torch.float64)
    assert emoe.keys().shape == (4, 8)  # KeyRouter takes the bank, and neither device nor dtype
    mlp = build_router(MoESettings(router="mlp"), 8, 4, bank=bank, dtype=torch.float64)
    assert mlp.w1.weight.dtype == torch.float64  # initialised from the bank's keys
    torch.testing.assert_close(
        mlp.w1.weight, nn.functional.normalize(bank.w_in[..., :6].transpose(1, 2), dim=-1).mean(1).double()
    )
    topk = build_router(MoESettings(), 8, 4, bank=bank, device="meta", dtype=torch.float64)
    assert topk.proj.weight.device.type == "meta" and topk.proj.weight.dtype == torch.float64
    with pytest.raises(ConfigError, match=r"^noise: router 'hash' does not use this setting"):
        build_router(MoESettings(router="hash", noise="gaussian"), 8, 4)  # the settings are checked


def test_setting_errors_name_the_key_path_the_default_and_the_routers_that_use_it() -> None:
    def message(**settings: object) -> str:
        with pytest.raises(ConfigError) as info:
            MoESettings(**settings).check("models.moe")  # type: ignore[arg-type]
        return str(info.value)

    text = message(router="dense_to_sparse", top_k=1)
    head = (
        "models.moe.top_k: router 'dense_to_sparse' does not use this setting; "
        "leave it at its default 2 or choose a router that uses it ("
    )
    assert text.startswith(head) and text.endswith(") (got 1)")
    users = set(text[len(head) : -len(") (got 1)")].split(", "))
    assert {"topk", "sigmoid", "noisy_topk", "expert_choice", "hash", "lsh", "emoe", "mlp", "token_hash"} <= users
    assert not users & {"dense_to_sparse", "activation_dense_to_sparse"}
    assert users <= set(REGISTRY.names("router"))  # routers only: the moe brick has a capacity_factor too
    assert message(router="expert_choice", noise="gaussian") == (
        "models.moe.noise: router 'expert_choice' does not use this setting; leave it at its default 'none' "
        "or choose a router that uses it (sigmoid, topk) (got 'gaussian')"
    )
    assert message(router="hash", balance="aux_free") == (
        "models.moe.balance: router 'hash' does not use this setting; leave it at its default 'aux_loss' "
        "or choose a router that uses it (sigmoid, topk) (got 'aux_free')"
    )
    assert message(router="topk", balance_rate=0.01) == (
        "models.moe.balance_rate: is the rate of balance 'aux_free' only; leave it at its default 0.001 "
        "with balance 'aux_loss' (got 0.01)"
    )
    assert message(router="topkk").startswith("models.moe.router: unknown router name")
    # a setting the router does not use is accepted at its default, and 'none' never needs a user
    MoESettings(router="hash", balance="none").check()
    MoESettings(router="dense_to_sparse", balance="aux_loss", top_k=2, noise="none").check("models.moe")
    MoESettings(router="topk", balance="aux_free", balance_rate=0.01).check()


def _reference_plan(table: list[list[int]], weights: list[list[float]], e: int, c: float | None, priority: str):
    """Dispatch in plain Python: assignments ranked by the priority, each expert keeps its first C."""
    n, k = len(table), len(table[0])
    flat = [(t, s, table[t][s], weights[t][s]) for t in range(n) for s in range(k)]  # token-major: index t * k + s
    rank = {
        "position": lambda i: i,
        "slot": lambda i: (flat[i][1], flat[i][0]) if k > 1 else i,
        "weight": lambda i: (-flat[i][3], i),
    }[priority]
    cap = None if c is None else max(1, math.ceil(c * n * k / e))
    order, counts = [], [0] * e
    for expert in range(e):
        mine = sorted((i for i in range(n * k) if flat[i][2] == expert), key=rank if c is not None else (lambda i: i))
        mine = mine if cap is None else mine[:cap]
        order += mine
        counts[expert] = len(mine)
    kept = [i in set(order) for i in range(n * k)]
    return order, [flat[i][0] for i in order], [flat[i][3] for i in order], counts, kept, cap


@pytest.mark.parametrize("capacity_factor", [None, 0.5, 0.75, 1.0, 1.3, 4.0])
@pytest.mark.parametrize("priority", ["position", "slot", "weight"])
def test_plan_dispatch_equals_a_plain_python_dispatch(capacity_factor: float | None, priority: str) -> None:
    """Random top-2 choices of 9 tokens over 3 experts (ceil(c * 18 / 3) rows per expert, not a whole
    number of tokens), distinct weights: the plan is the plain-Python one field by field."""
    gen = torch.Generator().manual_seed(3)
    table = [torch.randperm(3, generator=gen)[:2].tolist() for _ in range(9)]
    weights = torch.rand(9, 2, generator=gen).tolist()  # float32 values, as FixedRouter stores them
    plan = plan_dispatch(FixedRouter(table, weights, 3)(torch.zeros(9, 4)), capacity_factor, priority)  # type: ignore[arg-type]
    order, tokens, w, counts, kept, cap = _reference_plan(table, weights, 3, capacity_factor, priority)
    assert plan.order.tolist() == order and plan.token_idx.tolist() == tokens and plan.weights.tolist() == w
    assert plan.counts.tolist() == counts and plan.kept.tolist() == kept and plan.capacity == cap
    assert sum(counts) == len(order) and plan.counts.dtype == torch.int64


def test_moe_forward_equals_a_per_assignment_loop_with_capacity_and_shared_expert() -> None:
    """y_t = sum over t's kept assignments of w * expert(x_t), plus the shared expert; on a (B, T, D)
    input in float64 (1e-12); the record and the losses are those of this forward."""
    torch.manual_seed(0)
    bank = GroupedFFNExperts(4, 6, 5, act="silu", glu=True, bias=True, dtype=torch.float64)
    router = TopKRouter(6, 4, top_k=2, bias=True).double()
    shared = FeedForward(6, 7, dtype=torch.float64)
    moe = MoE(bank, router, shared=shared, capacity_factor=0.6, priority="weight").train()
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    y = moe(x)
    flat = x.reshape(10, 6)
    routing = router(x)
    plan = plan_dispatch(routing, 0.6, "weight")  # C = ceil(0.6 * 20 / 4) = 3
    ref = shared(flat)
    for i in plan.order.tolist():
        t, e = int(routing.token_idx[i]), int(routing.expert_idx[i])
        ref[t] = ref[t] + routing.weights[i] * bank.to_feed_forward(e)(flat[t : t + 1])[0]
    torch.testing.assert_close(y, ref.reshape(2, 5, 6), rtol=0, atol=1e-12)
    rec = moe.record
    kept = int(plan.counts.sum())
    assert rec is not None and rec.capacity == 3 and rec.leading_shape == (2, 5) and rec.dropped == 20 - kept > 0
    assert torch.equal(rec.kept, plan.kept) and torch.equal(rec.load, plan.counts)
    assert set(moe.aux_losses) == {"load_balance", "z_loss"}
    torch.testing.assert_close(moe.aux_losses["z_loss"], routing.aux_losses["z_loss"], rtol=0, atol=1e-12)


def test_moe_construction_and_the_bank_contract() -> None:
    experts = [nn.Linear(4, 4) for _ in range(3)]
    moe = MoE(experts, FixedRouter([[0]], [[1.0]], 3))
    assert isinstance(moe.experts, ExpertList) and moe.num_experts == 3 and list(moe.experts) == experts
    assert (moe.shared, moe.capacity_factor, moe.priority, moe.aux_losses, moe.record) == (None, None, "slot", {}, None)
    assert MoE(nn.ModuleList(experts), FixedRouter([[0]], [[1.0]], 3)).num_experts == 3
    bank = ExpertList(experts)
    assert MoE(bank, FixedRouter([[0]], [[1.0]], 3)).experts is bank  # not wrapped twice
    with pytest.raises(ValueError, match=r"^MoE: router routes to 4 experts, the bank has 3$"):
        MoE(GroupedFFNExperts(3, 8, 8), TopKRouter(8, 4))(torch.randn(2, 8))


def test_expert_list_skips_experts_without_rows() -> None:
    """An expert with no rows is not called (a BatchNorm expert would refuse an empty batch); with no
    rows at all the output is empty, with the experts' width."""
    calls: list[int] = []

    class Counting(nn.Module):
        def __init__(self, i: int) -> None:
            super().__init__()
            self.i = i

        def forward(self, x: Tensor) -> Tensor:
            calls.append(self.i)
            return x + self.i

    bank = ExpertList([Counting(i) for i in range(4)])
    x = torch.arange(6.0).reshape(3, 2)
    out = bank(x, torch.tensor([0, 2, 0, 1]))
    assert calls == [1, 3] and torch.equal(out, torch.tensor([[1.0, 2.0], [3.0, 4.0], [7.0, 8.0]]))
    calls.clear()
    assert torch.equal(bank(x[1:2], torch.tensor([0, 0, 1, 0])), x[1:2] + 2) and calls == [2]
    calls.clear()
    empty = bank(torch.zeros(0, 2), torch.zeros(4, dtype=torch.long))
    assert calls == [] and empty.shape == (0, 2)
    with pytest.raises(ValueError, match="zip"):  # counts for 1 expert of 4: refused, not truncated
        bank(x, torch.tensor([3]))


def test_grouped_ffn_experts_shapes_defaults_and_initialisation() -> None:
    """Per-expert nn.Linear initialisation U(-1/sqrt(fan_in), 1/sqrt(fan_in)): fan-in D for the
    input projection, H for the output one (D != H here; 4 * 16 * 128 draws reach the bound)."""
    torch.manual_seed(0)
    bank = GroupedFFNExperts(4, 16, 64, glu=True, bias=True, dtype=torch.float64)
    assert (bank.act_name, bank.backend) == ("gelu", "auto")
    assert bank.w_in.shape == (4, 16, 128) and bank.w_out.shape == (4, 64, 16)
    assert bank.b_in is not None and bank.b_out is not None
    assert bank.b_in.shape == (4, 128) and bank.b_out.shape == (4, 16) and bank.w_in.dtype == torch.float64
    for t, bound in ((bank.w_in, 0.25), (bank.b_in, 0.25), (bank.w_out, 0.125), (bank.b_out, 0.125)):
        lo, hi = float(t.detach().min()), float(t.detach().max())
        assert -bound <= lo < -0.9 * bound and 0.9 * bound < hi <= bound, bound  # both ends of the range
    plain = GroupedFFNExperts(4, 16, 64)
    assert (plain.glu, plain.b_in, plain.b_out, plain.w_in.shape) == (False, None, None, (4, 16, 64))
    assert all(p.device.type == "meta" for p in GroupedFFNExperts(2, 4, 3, bias=True, device="meta").parameters())


@pytest.mark.parametrize(("act", "glu", "bias"), [("gelu", False, True), ("silu", True, True), ("relu", True, False)])
def test_grouped_ffn_experts_forward_by_hand(act: str, glu: bool, bias: bool) -> None:
    """Rows of expert e: act(x W_in[e] + b_in[e]) W_out[e] + b_out[e], or with glu
    (act(x W_a[e] + b_a) * (x W_b[e] + b_b)) W_out[e] + b_out[e]; float64 by hand, unequal counts."""
    torch.manual_seed(0)
    e, d, h = 3, 6, 5
    bank = GroupedFFNExperts(e, d, h, act=act, glu=glu, bias=bias, backend="split", dtype=torch.float64)  # type: ignore[arg-type]
    counts = torch.tensor([2, 0, 3])
    x = torch.randn(5, d, dtype=torch.float64)
    f = {"gelu": nn.functional.gelu, "silu": nn.functional.silu, "relu": torch.relu}[act]
    rows = []
    for i, ex in ((0, 0), (1, 0), (2, 2), (3, 2), (4, 2)):
        z = x[i] @ bank.w_in[ex] + (bank.b_in[ex] if bank.b_in is not None else 0)
        hidden = f(z[:h]) * z[h:] if glu else f(z)
        rows.append(hidden @ bank.w_out[ex] + (bank.b_out[ex] if bank.b_out is not None else 0))
    torch.testing.assert_close(bank(x, counts), torch.stack(rows), rtol=0, atol=1e-12)


def test_the_bank_runs_the_backend_it_was_given(monkeypatch: pytest.MonkeyPatch) -> None:
    import brickwork.nn.routing.experts as experts_module

    asked: list[str] = []
    real = experts_module.grouped_linear

    def recording(*args: object, backend: str = "auto", **kw: object) -> Tensor:
        asked.append(backend)
        return real(*args, backend=backend, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(experts_module, "grouped_linear", recording)
    GroupedFFNExperts(2, 4, 3, backend="bmm")(torch.randn(3, 4), torch.tensor([1, 2]))
    assert asked == ["bmm", "bmm"]  # both projections


def test_plan_dispatch_gives_first_choices_priority_by_default() -> None:
    table, weights = [[1, 0], [0, 1], [0, 1], [0, 1]], [[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.7, 0.3]]
    routing = FixedRouter(table, weights, 2)(torch.zeros(4, 4))
    default, slot = plan_dispatch(routing, 0.5), plan_dispatch(routing, 0.5, "slot")
    assert torch.equal(default.kept, slot.kept) and not torch.equal(
        default.kept, plan_dispatch(routing, 0.5, "position").kept
    )


def test_a_bfloat16_moe_with_float32_router_weights() -> None:
    """The key routers give float32 weights (their score dtype) on a bfloat16 model: the MoE casts
    them to the input's dtype before scaling and scattering."""
    torch.manual_seed(0)
    moe = moe_ffn(8, 12, 4, MoESettings(router="emoe"), dtype=torch.bfloat16)
    x = torch.randn(2, 3, 8, dtype=torch.bfloat16)
    assert moe.router(x).weights.dtype == torch.float32
    y = moe(x)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape and torch.isfinite(y).all()
