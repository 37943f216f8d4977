"""Routers: gate functions, noise, expert choice, hashing, dense-to-sparse, balancing bias."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from brickwork.nn.hooks import after_optimizer_step
from brickwork.nn.moe import MoE
from brickwork.nn.routing import (
    DenseToSparseRouter,
    ExpertChoiceRouter,
    GroupedFFNExperts,
    HashRouter,
    KeyRouter,
    MLPRouter,
    TokenHashRouter,
    TopKRouter,
    activation_dense_to_sparse,
    anneal,
    feed_token_ids,
    load_balance_loss,
    router_z_loss,
    sigmoid_topk,
    wants_token_ids,
)

D, E = 8, 4


def _x(n: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def test_softmax_gates_weights() -> None:
    torch.manual_seed(0)
    r = TopKRouter(D, E, top_k=2, gate="softmax_topk").eval()
    x = _x()
    out = r(x)
    probs = torch.softmax(r.proj(x), -1)
    top = probs.topk(2, -1)
    assert torch.equal(out.expert_idx.view(-1, 2), top.indices)
    torch.testing.assert_close(out.weights.view(-1, 2), top.values)  # not renormalised
    assert torch.equal(out.token_idx, torch.arange(12).repeat_interleave(2))

    r.gate = "softmax_topk_renorm"
    renorm = r(x).weights.view(-1, 2)
    torch.testing.assert_close(renorm, top.values / top.values.sum(-1, keepdim=True))
    r.gate = "topk_softmax"  # softmax over the k chosen logits: same values as renormalising
    torch.testing.assert_close(r(x).weights.view(-1, 2), renorm)


def test_sigmoid_gates_weights() -> None:
    torch.manual_seed(0)
    r = TopKRouter(D, E, top_k=2, gate="sigmoid_topk").eval()
    x = _x()
    s = torch.sigmoid(r.proj(x))
    top = s.topk(2, -1)
    out = r(x)
    torch.testing.assert_close(out.weights.view(-1, 2), top.values)
    assert out.probs is not None
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(12))  # normalised affinities
    r.gate = "sigmoid_topk_renorm"
    torch.testing.assert_close(r(x).weights.view(-1, 2), top.values / top.values.sum(-1, keepdim=True))


@pytest.mark.parametrize("noise", ["jitter", "gaussian", "learned"])
def test_noise_only_in_training(noise: str) -> None:
    torch.manual_seed(0)
    r = TopKRouter(D, E, noise=noise, noise_scale=0.5)  # type: ignore[arg-type]
    x = _x()
    r.eval()
    assert torch.equal(r(x).weights, r(x).weights)  # deterministic
    r.train()
    assert not torch.allclose(r(x).logits, r(x).logits)  # type: ignore[arg-type]


def _routers() -> dict[str, nn.Module]:
    return {
        "topk_renorm": TopKRouter(D, E, gate="softmax_topk_renorm"),
        "topk_plain": TopKRouter(D, E, gate="softmax_topk", bias=True),
        "topk_softmax": TopKRouter(D, E, gate="topk_softmax"),
        "sigmoid": TopKRouter(D, E, gate="sigmoid_topk_renorm"),
        "learned_noise": TopKRouter(D, E, noise="learned"),
        "expert_choice": ExpertChoiceRouter(D, E, capacity_factor=1.0, bias=True),
        "dense_to_sparse": DenseToSparseRouter(D, E),
        "activation_dts": activation_dense_to_sparse(D, E),
    }


@pytest.mark.parametrize("name", list(_routers()))
def test_gradient_reaches_every_router_parameter(name: str) -> None:
    torch.manual_seed(0)
    router = _routers()[name]
    moe = MoE(GroupedFFNExperts(E, D, 12, act="silu", glu=True), router).train()
    x = torch.randn(2, 6, D)
    y = moe(x)
    loss = y.square().mean() + sum(moe.aux_losses.values())
    loss.backward()
    for pname, p in router.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: no gradient for {pname}"


def test_expert_choice_is_balanced_by_construction() -> None:
    torch.manual_seed(0)
    r = ExpertChoiceRouter(D, E, capacity_factor=2.0)
    # Skew the scorer hard towards expert 0: token choice would send everything there.
    with torch.no_grad():
        r.proj.weight.zero_()
        r.proj.weight[0] = 5.0
    out = r(torch.rand(3, 10, D))
    c = math.ceil(30 * 2.0 / E)
    assert r.capacity(30) == c == 15
    assert torch.equal(torch.bincount(out.expert_idx, minlength=E), torch.full((E,), c))
    # each expert's C tokens are distinct and are its C highest-scoring tokens
    per_expert = out.token_idx.view(E, c)
    assert all(len(set(row.tolist())) == c for row in per_expert)
    assert out.probs is not None
    best = out.probs.t().topk(c, -1).indices
    assert torch.equal(per_expert.sort(-1).values, best.sort(-1).values)


def test_hash_router_is_fixed_and_parameter_free() -> None:
    r = HashRouter(D, E, top_k=2, key="input")
    assert list(r.parameters()) == []
    x = _x(20)
    a, b = r(x), r(x.clone())
    assert torch.equal(a.expert_idx, b.expert_idx)
    pairs = a.expert_idx.view(-1, 2)
    assert torch.all(pairs[:, 0] != pairs[:, 1])  # k distinct experts
    torch.testing.assert_close(a.weights, torch.full((40,), 0.5))
    # identical tokens meet the same expert
    dup = r(torch.cat([x[:1], x[:1]])).expert_idx.view(-1, 2)
    assert torch.equal(dup[0], dup[1])


def test_hash_router_position_and_token_id_keys() -> None:
    pos = HashRouter(D, E, key="position")
    out = pos(torch.randn(3, 5, D)).expert_idx.view(3, 5)
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])  # same positions, same experts

    tok = HashRouter(D, E, key="token_id")
    with pytest.raises(RuntimeError, match="set_token_ids"):
        tok(torch.randn(2, 3, D))

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(50, D)
            self.moe = MoE([nn.Linear(D, D) for _ in range(E)], HashRouter(D, E, key="token_id"))

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.moe(self.embed(ids))

    model = Model()
    handle = feed_token_ids(model)
    ids = torch.tensor([[7, 3, 7], [3, 9, 9]])
    model(ids)
    rec = model.moe.record
    assert rec is not None
    by_token = rec.expert_idx.view(2, 3)
    assert by_token[0, 0] == by_token[0, 2] and by_token[0, 1] == by_token[1, 0] and by_token[1, 1] == by_token[1, 2]
    handle.remove()


@pytest.mark.parametrize("schedule", ["linear", "cosine", "exponential"])
def test_temperature_schedule_end_points(schedule: str) -> None:
    r = DenseToSparseRouter(D, E, tau_start=2.0, tau_end=0.3, schedule=schedule)  # type: ignore[arg-type]
    assert math.isclose(r.temperature, 2.0)
    after_optimizer_step(nn.Sequential(r), progress=1.0)
    assert math.isclose(r.temperature, 0.3)
    r.set_progress(0.5)
    mid = r.temperature
    assert 0.3 < mid < 2.0
    assert math.isclose(anneal(2.0, 0.3, 0.5, schedule), mid)  # type: ignore[arg-type]
    # progress travels with the state dict
    other = DenseToSparseRouter(D, E, schedule=schedule)  # type: ignore[arg-type]
    other.load_state_dict(r.state_dict())
    assert other.progress == 0.5


def test_dense_to_sparse_goes_from_dense_to_sparse() -> None:
    torch.manual_seed(0)
    r = DenseToSparseRouter(D, E, tau_start=50.0, tau_end=0.01, threshold=0.05, gumbel=False).eval()
    x = _x(30) * 3
    r.set_progress(0.0)
    assert r(x).num_assignments == 30 * E  # near-uniform weights: every expert clears the threshold
    r.set_progress(1.0)
    sparse = r(x).num_assignments
    assert 30 <= sparse <= 36  # near-one-hot: about one expert per token (a near-tie may keep two)
    r.eval_top_k = 2
    out = r(x)
    assert out.num_assignments == 60


def test_activation_dense_to_sparse_definition() -> None:
    torch.manual_seed(0)
    r = activation_dense_to_sparse(D, E, activation="tanh").eval()
    r.set_progress(0.25)
    x = _x()
    expected = torch.softmax(torch.tanh(r.proj(x)) / r.temperature, -1)
    out = r(x)
    assert out.probs is not None
    torch.testing.assert_close(out.probs, expected)
    with pytest.raises(ValueError):
        activation_dense_to_sparse(D, E, activation="none")


def test_aux_loss_free_bias_update_direction() -> None:
    torch.manual_seed(0)
    r = TopKRouter(D, E, top_k=1, balance_rate=0.005, load_balance=False, z_loss=False, bias=True)
    with torch.no_grad():
        r.proj.bias.copy_(torch.tensor([0.8, 0.0, 0.0, -0.4]))  # expert 0 favoured, 3 disfavoured
    x = torch.randn(256, D)
    r.train()
    out = r(x)
    load = torch.bincount(out.expert_idx, minlength=E).double()
    assert load[0] > load.mean() > load[3]
    weights_before = out.weights.clone()
    after_optimizer_step(nn.Sequential(r))
    assert r.selection_bias is not None
    bias = r.selection_bias.bias
    torch.testing.assert_close(bias, (0.005 * torch.sign(load.mean() - load)).float())
    assert bias[0] < 0 < bias[3]  # overloaded down, underloaded up
    assert not bias.requires_grad and all(p is not bias for p in r.parameters())
    # the weights come from the unbiased scores (top-1 renormalised: exactly 1)
    torch.testing.assert_close(r(x).weights, weights_before)
    # repeated steps balance the load without any loss (the fixed-step sign rule then
    # oscillates around balance with an amplitude set by the rate)
    imbalance = []
    for _ in range(100):
        step_load = torch.bincount(r(x).expert_idx, minlength=E).double()
        imbalance.append(float(step_load.max() / step_load.mean()))
        after_optimizer_step(nn.Sequential(r))
    assert max(imbalance[-10:]) < 1.15 < 2.0 < float(load.max() / load.mean())


def test_aux_losses_only_in_training() -> None:
    r = TopKRouter(D, E)
    assert set(r.train()(_x()).aux_losses) == {"load_balance", "z_loss"}
    assert r.eval()(_x()).aux_losses == {}


def test_key_routers_read_the_experts_keys() -> None:
    """emoe scores are x . mean key (the activated half of a gated bank); mlp starts at MoEfication's init."""
    torch.manual_seed(0)
    bank = GroupedFFNExperts(4, 8, 6, act="silu", glu=True)  # w_in (4, 8, 12): [activated | gate]
    x = torch.randn(5, 8)
    emoe = KeyRouter(8, 4, top_k=2, bank=bank)
    keys = bank.w_in[..., :6].mean(2)  # (E, D)
    routing = emoe(x)
    torch.testing.assert_close(routing.logits, x @ keys.t())
    assert torch.equal(routing.expert_idx.view(5, 2), (x @ keys.t()).topk(2, dim=-1).indices)
    assert torch.equal(routing.weights, torch.ones(10))
    with torch.no_grad():
        bank.w_in.mul_(2)  # the gate follows the bank's current weights
    torch.testing.assert_close(emoe(x).logits, 2 * x @ keys.t())

    mlp = MLPRouter(8, 4, top_k=4, bank=bank)
    normalised = torch.nn.functional.normalize(bank.w_in[..., :6].transpose(1, 2), dim=-1).mean(1)
    torch.testing.assert_close(mlp.w1.weight, normalised)
    assert torch.equal(mlp.w2.weight, torch.eye(4))
    assert torch.equal(mlp(x).expert_idx.view(5, 4).sort(-1).values, torch.arange(4).expand(5, 4))  # k = E: all
    with pytest.raises(ValueError, match="top_k"):
        KeyRouter(8, 4, top_k=5, bank=bank)


class _PlainBank(nn.Module):
    """A bank with nothing but ``w_in`` (E, D, H/E), all that :class:`KeyBank` asks for (no ``glu``)."""

    def __init__(self, w_in: torch.Tensor) -> None:
        super().__init__()
        self.w_in = nn.Parameter(w_in)


def test_key_router_reads_a_plain_bank_whole_and_gives_softmax_probs_and_unit_weights() -> None:
    """A bank without ``glu`` (or with ``glu=False``) is read whole: every column is a key. The
    routing carries softmax(logits) over the experts as probs and the logits, and its weights are
    ones in the score dtype. float64 throughout, so the by-hand values agree to 1e-12."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, D, generator=gen, dtype=torch.float64)  # N = 6 != E = 4: a softmax over tokens differs
    for bank in (
        _PlainBank(torch.randn(E, D, 5, generator=gen, dtype=torch.float64)),
        GroupedFFNExperts(E, D, 5, glu=False, dtype=torch.float64),
    ):
        r = KeyRouter(D, E, top_k=2, bank=bank)  # type: ignore[arg-type]
        assert r.num_experts == E
        logits = x @ bank.w_in.detach().mean(2).t()  # all 5 columns of each expert
        out = r(x)
        assert out.num_experts == E and out.logits is not None and out.probs is not None
        torch.testing.assert_close(out.logits, logits, rtol=0, atol=1e-12)
        torch.testing.assert_close(out.probs, torch.softmax(logits, -1), rtol=0, atol=1e-12)
        assert torch.equal(out.expert_idx.view(6, 2), logits.topk(2, -1).indices)
        assert out.weights.dtype == torch.float64 and torch.equal(out.weights, torch.ones(12, dtype=torch.float64))


def test_mlp_router_scores_are_w2_tanh_w1_of_the_unit_input() -> None:
    """MoEfication's router is ``W2 tanh(W1 x / |x|)`` with x normalised per token (tokens of very
    different norms here), two bias-free matrices, and softmax probs over the experts."""
    gen = torch.Generator().manual_seed(1)
    r = MLPRouter(D, E, top_k=2, dtype=torch.float64)
    assert {n for n, _ in r.named_parameters()} == {"w1.weight", "w2.weight"}
    assert all(p.dtype == torch.float64 for p in r.parameters())
    x = torch.randn(2, 3, D, generator=gen, dtype=torch.float64) * torch.tensor([0.1, 1.0, 30.0])[:, None]
    flat = x.reshape(6, D)
    unit = flat / flat.norm(dim=-1, keepdim=True)
    expected = torch.tanh(unit @ r.w1.weight.detach().t()) @ r.w2.weight.detach().t()
    torch.testing.assert_close(r.scores(flat), expected, rtol=0, atol=1e-12)
    out = r(x)
    assert out.logits is not None and out.probs is not None
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.probs, torch.softmax(expected, -1), rtol=0, atol=1e-12)
    assert torch.equal(out.expert_idx.view(6, 2), expected.topk(2, -1).indices)


def test_key_routers_defaults_and_refusals_name_the_router() -> None:
    bank = GroupedFFNExperts(E, D, 6, glu=True)
    assert KeyRouter(D, E, bank=bank).top_k == 2 and MLPRouter(D, E).top_k == 2
    assert KeyRouter(D, E, top_k=1, bank=bank).top_k == 1 and MLPRouter(D, E, top_k=1).top_k == 1
    for cls in (KeyRouter, MLPRouter):
        name = cls.__name__
        with pytest.raises(ValueError, match=rf"^{name}: top_k must be in \[1, 4\], got 0$"):
            cls(D, E, top_k=0, bank=bank)
        wrong = GroupedFFNExperts(E, D - 2, 6, glu=True)  # w_in (4, 6, 12)
        with pytest.raises(ValueError, match=rf"^{name}: the bank's w_in \(4, 6, 12\) is not \(4, 8, \.\.\.\)$"):
            cls(D, E, bank=wrong)


def test_key_routers_stay_on_the_device_asked_for() -> None:
    """On the meta device (no data, no CPU fallback): a tensor made on the default device would be
    on the CPU."""
    bank = GroupedFFNExperts(E, D, 6, glu=True, device="meta")
    x = torch.randn(5, D, device="meta")
    for r in (KeyRouter(D, E, bank=bank), MLPRouter(D, E, device="meta"), MLPRouter(D, E, bank=bank, device="meta")):
        out = r(x)
        assert out.weights.device.type == "meta" and out.token_idx.device.type == "meta"
        assert all(p.device.type == "meta" for p in r.parameters())


@pytest.mark.parametrize("key", ["input", "position"])
def test_hash_router_weights_are_one_over_k_in_the_input_dtype_and_device(key: str) -> None:
    r = HashRouter(D, E, top_k=2, key=key).double()  # type: ignore[arg-type]
    out = r(torch.randn(2, 3, D, dtype=torch.float64))
    assert out.weights.dtype == torch.float64 and torch.equal(out.weights, torch.full((12,), 0.5, dtype=torch.float64))
    meta = HashRouter(D, E, top_k=2, key=key, device="meta")  # type: ignore[arg-type]
    assert meta(torch.randn(2, 3, D, device="meta")).weights.device.type == "meta"


def test_wants_token_ids_only_when_a_router_reads_them() -> None:
    def moe(router: nn.Module) -> nn.Module:
        return nn.Sequential(nn.Linear(D, D), MoE([nn.Linear(D, D) for _ in range(E)], router))

    assert not wants_token_ids(moe(HashRouter(D, E, key="input")))
    assert not wants_token_ids(moe(HashRouter(D, E, key="position")))
    assert not wants_token_ids(moe(TopKRouter(D, E)))
    assert wants_token_ids(moe(HashRouter(D, E, key="token_id")))
    assert wants_token_ids(moe(TokenHashRouter(D, E, vocab_size=10)))


def test_progress_is_clamped_to_the_unit_interval() -> None:
    r = DenseToSparseRouter(D, E, tau_start=2.0, tau_end=0.3, schedule="linear")
    r.set_progress(1.5)
    assert r.progress == 1.0 and math.isclose(r.temperature, 0.3)
    r.set_progress(-0.5)
    assert r.progress == 0.0 and math.isclose(r.temperature, 2.0)


def test_dense_to_sparse_defaults_are_evomoe() -> None:
    r = DenseToSparseRouter(D, E)
    assert (r.tau_start, r.tau_end, r.schedule, r.threshold) == (2.0, 0.3, "exponential", 0.02)
    assert (r.activation, r.gumbel, r.eval_top_k, r.load_balance, r.z_loss) == ("none", True, 0, True, False)
    assert r.proj.bias is not None and r.progress == 0.0
    a = activation_dense_to_sparse(D, E)
    assert (a.tau_start, a.tau_end, a.schedule, a.threshold) == (2.0, 0.3, "exponential", 0.02)
    assert (a.activation, a.gumbel, a.eval_top_k, a.load_balance, a.z_loss) == ("tanh", False, 0, True, False)
    assert DenseToSparseRouter(D, E, eval_top_k=E).eval_top_k == E
    assert DenseToSparseRouter(D, E, bias=False).proj.bias is None
    assert DenseToSparseRouter(D, E, dtype=torch.float64).proj.weight.dtype == torch.float64
    assert DenseToSparseRouter(D, E, device="meta").proj.weight.device.type == "meta"
    with pytest.raises(ValueError, match=r"^DenseToSparseRouter: eval_top_k 5 > num_experts 4$"):
        DenseToSparseRouter(D, E, eval_top_k=E + 1)


@pytest.mark.parametrize("activation", ["none", "sigmoid", "gelu", "softplus"])
def test_dense_to_sparse_forward_by_hand(activation: str) -> None:
    """In evaluation (no Gumbel noise): weights ``softmax(act(W x + b) / tau)``; an expert is kept
    when its weight exceeds the threshold, and each token's best one always; the assignments in
    token-major order, with those weights. float64, so by hand agrees to 1e-12."""
    torch.manual_seed(0)
    r = DenseToSparseRouter(D, E, threshold=0.2, activation=activation, z_loss=True).double().eval()  # type: ignore[arg-type]
    r.set_progress(0.4)
    tau = r.temperature
    x = torch.randn(2, 5, D, dtype=torch.float64) * 2
    z = r.proj(x.reshape(10, D)).detach()
    act = {"none": lambda t: t, "sigmoid": torch.sigmoid, "gelu": torch.nn.functional.gelu}.get(
        activation, torch.nn.functional.softplus
    )
    scaled = act(z) / tau
    probs = torch.softmax(scaled, -1)
    keep = probs > 0.2
    keep[torch.arange(10), probs.argmax(-1)] = True
    tokens, experts = keep.nonzero(as_tuple=True)
    out = r(x)
    assert out.num_tokens == 10 and out.num_experts == E and out.top_k is None and out.aux_losses == {}
    assert torch.equal(out.token_idx, tokens) and torch.equal(out.expert_idx, experts)
    assert 10 < out.num_assignments < 10 * E  # some tokens keep more than their best expert, none all
    assert out.probs is not None and out.logits is not None
    torch.testing.assert_close(out.probs, probs, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.logits, scaled, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.weights, probs[tokens, experts], rtol=0, atol=1e-12)
    # evaluation by the top k instead of the threshold (EvoMoE evaluates top-1)
    r.eval_top_k = 1
    top1 = r(x)
    assert torch.equal(top1.token_idx, torch.arange(10)) and torch.equal(top1.expert_idx, probs.argmax(-1))


def test_dense_to_sparse_training_adds_gumbel_noise_and_its_losses() -> None:
    """Training: weights ``softmax((logits + g) / tau)`` with g ~ Gumbel(0, 1); the load-balance
    loss over the chosen assignments and the z-loss on the tempered logits (both unweighted)."""
    torch.manual_seed(0)
    r = DenseToSparseRouter(D, E, threshold=0.2, z_loss=True).double().train()
    r.set_progress(0.7)
    tau = r.temperature
    x = torch.randn(10, D, dtype=torch.float64)
    torch.manual_seed(3)
    out = r(x)
    torch.manual_seed(3)
    logits = r.proj(x).detach()
    g = -torch.empty(10, E, dtype=torch.float64).exponential_().log()
    weights_all = torch.softmax((logits + g) / tau, -1)
    keep = weights_all > 0.2
    keep[torch.arange(10), weights_all.argmax(-1)] = True
    tokens, experts = keep.nonzero(as_tuple=True)
    assert torch.equal(out.token_idx, tokens) and torch.equal(out.expert_idx, experts)
    torch.testing.assert_close(out.weights.detach(), weights_all[tokens, experts], rtol=0, atol=1e-12)
    probs = torch.softmax(logits / tau, -1)  # the noiseless distribution: P_i and the record's entropy
    torch.testing.assert_close(out.probs.detach(), probs, rtol=0, atol=1e-12)  # type: ignore[union-attr]
    assert set(out.aux_losses) == {"load_balance", "z_loss"}
    expected_lb = load_balance_loss(probs, experts, E)
    torch.testing.assert_close(out.aux_losses["load_balance"].detach(), expected_lb, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.aux_losses["z_loss"].detach(), router_z_loss(logits / tau), rtol=0, atol=1e-12)
    off = DenseToSparseRouter(D, E, load_balance=False, z_loss=False).train()
    assert off(x.float()).aux_losses == {}


def test_dense_to_sparse_threshold_is_strict_and_weights_come_back_in_the_input_dtype() -> None:
    """A zero scorer gives every expert weight exactly 1/4: at threshold 1/4 none exceeds it, so
    each token keeps its best expert only. bfloat16 inputs are routed in float32 and their weights
    returned in bfloat16."""
    r = DenseToSparseRouter(D, E, threshold=0.25, gumbel=False, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        r.proj.weight.zero_()
        r.proj.bias.zero_()  # type: ignore[union-attr]
    out = r(torch.randn(6, D, dtype=torch.bfloat16))
    assert torch.equal(out.token_idx, torch.arange(6)) and out.num_assignments == 6
    assert out.weights.dtype == torch.bfloat16 and out.logits is not None and out.logits.dtype == torch.float32


def test_expert_choice_forward_by_hand() -> None:
    """``S = softmax(x W)`` over the experts; expert e takes its C best tokens by S[:, e], weighted
    by those scores; expert-major order; the z-loss in training only. float64 by hand at 1e-12."""
    torch.manual_seed(0)
    r = ExpertChoiceRouter(D, E, capacity_factor=1.5, bias=True).double().eval()
    x = torch.randn(2, 5, D, dtype=torch.float64)  # N = 10, C = ceil(10 * 1.5 / 4) = 4
    logits = r.proj(x.reshape(10, D)).detach()
    s = torch.softmax(logits, -1)
    best = s.t().topk(4, -1)
    out = r(x)
    assert (out.num_tokens, out.num_experts, out.top_k, out.aux_losses) == (10, E, None, {})
    assert torch.equal(out.expert_idx, torch.arange(E).repeat_interleave(4))
    assert torch.equal(out.token_idx, best.indices.reshape(-1))
    assert out.logits is not None and out.probs is not None
    torch.testing.assert_close(out.weights, best.values.reshape(-1), rtol=0, atol=1e-12)
    torch.testing.assert_close(out.probs, s, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.logits, logits, rtol=0, atol=1e-12)
    train = r.train()(x)
    assert set(train.aux_losses) == {"z_loss"}
    torch.testing.assert_close(train.aux_losses["z_loss"].detach(), router_z_loss(logits), rtol=0, atol=1e-12)
    assert ExpertChoiceRouter(D, E, z_loss=False).train()(x.float()).aux_losses == {}


def test_expert_choice_dtype_and_device() -> None:
    default = ExpertChoiceRouter(D, E)
    assert (default.capacity_factor, default.z_loss, default.proj.bias) == (2.0, True, None)  # Zhou et al.'s c = 2
    assert default.extra_repr() == f"num_experts={E}, capacity_factor=2.0"
    assert ExpertChoiceRouter(D, E, dtype=torch.float64).proj.weight.dtype == torch.float64
    assert ExpertChoiceRouter(D, E, device="meta").proj.weight.device.type == "meta"
    assert ExpertChoiceRouter(D, E, bias=True).proj.bias is not None
    r = ExpertChoiceRouter(D, E, dtype=torch.bfloat16)
    out = r(torch.randn(6, D, dtype=torch.bfloat16))
    assert out.weights.dtype == torch.bfloat16 and out.logits is not None and out.logits.dtype == torch.float32
    on_meta = ExpertChoiceRouter(D, E, device="meta")(torch.randn(6, D, device="meta"))
    assert on_meta.expert_idx.device.type == on_meta.token_idx.device.type == "meta"


def test_anneal_by_hand() -> None:
    # p = 0.25 from 2 to 0.5: linear 2 - 1.5 / 4; cosine 0.5 + 1.5 (1 + cos(pi / 4)) / 2; geometric 2 (1/4)^(1/4)
    assert anneal(2.0, 0.5, 0.25, "linear") == 1.625
    assert math.isclose(anneal(2.0, 0.5, 0.25, "cosine"), 0.5 + 0.75 * (1 + math.sqrt(0.5)), rel_tol=1e-15)
    assert math.isclose(anneal(2.0, 0.5, 0.25), 2.0 * 0.25**0.25, rel_tol=1e-15)  # exponential by default
    assert math.isclose(anneal(2.0, 0.5, 0.25, "exponential"), 2.0 * 0.25**0.25, rel_tol=1e-15)
    assert anneal(0.5, 2.0, 0.5) == 1.0  # upwards too, from a start below 1: 0.5 * 4^(1/2)
    for schedule in ("linear", "cosine", "exponential"):  # progress clamped to [0, 1]
        assert anneal(2.0, 0.5, -1.0, schedule) == 2.0 and anneal(2.0, 0.5, 3.0, schedule) == 0.5  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^anneal: the exponential schedule needs positive start and end$"):
        anneal(2.0, 0.0, 0.5)
    with pytest.raises(ValueError, match=r"^anneal: the exponential schedule needs positive start and end$"):
        anneal(0.0, 2.0, 0.5)
    with pytest.raises(ValueError, match=r"^anneal: unknown schedule 'step'$"):
        anneal(2.0, 0.5, 0.5, "step")  # type: ignore[arg-type]


def test_topk_router_defaults_and_refusals() -> None:
    r = TopKRouter(D, E)
    assert (r.top_k, r.gate, r.noise, r.noise_scale, r.load_balance, r.z_loss) == (
        2, "softmax_topk_renorm", "none", 1e-2, True, True
    )  # fmt: skip
    assert r.proj.bias is None and r.noise_proj is None and r.selection_bias is None
    assert r.extra_repr() == f"num_experts={E}, top_k=2, gate=softmax_topk_renorm, noise=none"
    assert TopKRouter(D, E, top_k=1).top_k == 1 and TopKRouter(D, E, top_k=E).top_k == E
    for k in (0, E + 1):
        with pytest.raises(ValueError, match=rf"^TopKRouter: top_k must be in \[1, {E}\], got {k}$"):
            TopKRouter(D, E, top_k=k)
    learned = TopKRouter(D, E, noise="learned", bias=True, dtype=torch.float64, balance_rate=0.5)
    assert learned.noise_proj is not None and learned.noise_proj.bias is None and not learned.noise_proj.weight.any()
    assert (
        learned.proj.bias is not None and learned.proj.weight.dtype == learned.noise_proj.weight.dtype == torch.float64
    )
    assert learned.selection_bias is not None and learned.selection_bias.rate == 0.5
    meta = TopKRouter(D, E, noise="learned", balance_rate=0.1, device="meta")
    assert all(t.device.type == "meta" for t in [*meta.parameters(), *meta.buffers()])
    sig = sigmoid_topk(D, E)
    assert (sig.gate, sig.top_k, sig.noise, sig.load_balance, sig.z_loss, sig.selection_bias) == (
        "sigmoid_topk_renorm", 2, "none", True, True, None
    )  # fmt: skip


@pytest.mark.parametrize("noise", ["none", "jitter", "gaussian", "learned"])
@pytest.mark.parametrize(
    "gate", ["softmax_topk", "softmax_topk_renorm", "topk_softmax", "sigmoid_topk", "sigmoid_topk_renorm"]
)
def test_topk_router_training_forward_by_hand(gate: str, noise: str) -> None:
    """Every gate with every noise, in training, reproduced from the same random draws in float64:
    the choice, the weights, the probabilities, the logits, both losses and the load observed."""
    torch.manual_seed(0)
    r = TopKRouter(D, E, top_k=2, gate=gate, noise=noise, noise_scale=0.3, balance_rate=0.01, bias=True)  # type: ignore[arg-type]
    r = r.double().train()
    if r.noise_proj is not None:
        with torch.no_grad():
            r.noise_proj.weight.normal_()
    x = torch.randn(2, 5, D, dtype=torch.float64)
    torch.manual_seed(7)
    out = r(x)
    torch.manual_seed(7)
    flat = x.reshape(10, D)
    if noise == "jitter":
        flat = flat * torch.empty_like(flat).uniform_(0.7, 1.3)
    logits = r.proj(flat).detach()
    if noise == "gaussian":
        logits = logits + torch.randn_like(logits) * 0.3
    elif noise == "learned":
        assert r.noise_proj is not None
        logits = logits + torch.randn_like(logits) * torch.nn.functional.softplus(r.noise_proj(flat).detach())
    if gate.startswith("sigmoid"):
        scores = torch.sigmoid(logits)
        probs = scores / scores.sum(-1, keepdim=True)
    else:
        probs = torch.softmax(logits, -1)
        scores = probs
    top = scores.topk(2, dim=-1).indices  # the selection bias starts at zero
    if gate == "topk_softmax":
        weights = torch.softmax(logits.gather(-1, top), -1)
    else:
        weights = scores.gather(-1, top)
        if gate.endswith("renorm"):
            weights = weights / weights.sum(-1, keepdim=True)
    assert (out.num_tokens, out.num_experts, out.top_k) == (10, E, 2)
    assert torch.equal(out.expert_idx.view(10, 2), top)
    assert out.probs is not None and out.logits is not None
    torch.testing.assert_close(out.logits.detach(), logits, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.probs.detach(), probs, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.weights.detach().view(10, 2), weights, rtol=0, atol=1e-12)
    assert set(out.aux_losses) == {"load_balance", "z_loss"}
    lb = load_balance_loss(probs, top, E)
    torch.testing.assert_close(out.aux_losses["load_balance"].detach(), lb, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.aux_losses["z_loss"].detach(), router_z_loss(logits), rtol=0, atol=1e-12)
    assert r.selection_bias is not None
    load = torch.bincount(top.reshape(-1), minlength=E).double()
    assert torch.equal(r.selection_bias.pending_load, load)  # observed in training
    r.eval()(x)
    assert torch.equal(r.selection_bias.pending_load, load)  # not in evaluation
    r.after_step()
    assert torch.equal(r.selection_bias.bias, 0.01 * torch.sign(load.mean() - load))  # float64 after .double()


def test_topk_router_losses_can_be_switched_off_and_weights_return_in_the_input_dtype() -> None:
    x = torch.randn(6, D)
    assert set(TopKRouter(D, E, z_loss=False).train()(x).aux_losses) == {"load_balance"}
    assert set(TopKRouter(D, E, load_balance=False).train()(x).aux_losses) == {"z_loss"}
    half = TopKRouter(D, E, dtype=torch.bfloat16).train()
    out = half(x.bfloat16())
    assert out.weights.dtype == torch.bfloat16 and out.logits is not None and out.logits.dtype == torch.float32
    assert out.aux_losses["z_loss"].dtype == torch.float32
