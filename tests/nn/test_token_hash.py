"""Roller et al.'s token-id hash routing (a fixed, balanced table) and the LSH router's mixing."""

import copy

import pytest
import torch

from brickwork.models.moe import moe_lm
from brickwork.nn.routing import MoESettings, TokenHashRouter, balance_token_hash, frequency_balanced_table
from brickwork.nn.routing.hash import _LSH_BITS, HashRouter, _mix
from brickwork.nn.routing.token_hash import random_balanced_table

E = 8


@pytest.mark.parametrize("k", [1, 2, 3])
def test_random_table_is_balanced_on_every_prefix_and_k_distinct(k: int) -> None:
    table = random_balanced_table(203, E, k, seed=3)
    assert table.shape == (203, k)
    assert all(len(set(row.tolist())) == k for row in table)  # k distinct experts per id
    for v in range(1, 204):
        counts = torch.bincount(table[:v].reshape(-1), minlength=E)
        if v % E == 0:
            assert torch.all(counts == k * v // E)  # whole blocks: exactly equal
        assert int(counts.max() - counts.min()) <= k
    # a random table, not (id + c) mod E: consecutive ids rarely meet consecutive experts
    steps = (table[1:, 0] - table[:-1, 0]) % E
    assert float((steps == 1).float().mean()) < 0.5


def test_table_is_fixed_parameter_free_and_saved() -> None:
    r = TokenHashRouter(4, E, vocab_size=100, seed=1)
    assert list(r.parameters()) == []
    assert torch.equal(r.table, TokenHashRouter(4, E, vocab_size=100, seed=1).table)
    assert not torch.equal(r.table, TokenHashRouter(4, E, vocab_size=100, seed=2).table)
    other = TokenHashRouter(4, E, vocab_size=100, seed=2)
    other.load_state_dict(r.state_dict())
    ids = torch.randint(0, 100, (3, 7))
    r.set_token_ids(ids)
    other.set_token_ids(ids)
    x = torch.randn(3, 7, 4)
    assert torch.equal(r(x).expert_idx, other(x).expert_idx)
    assert torch.equal(r(x).expert_idx, r.table[ids.reshape(-1), 0].long())  # the expert is the id's entry
    r.set_token_ids(torch.tensor([[100]]))
    with pytest.raises(ValueError, match="vocab_size"):
        r(torch.randn(1, 1, 4))


def test_frequency_table_is_the_greedy_balanced_assignment() -> None:
    counts = torch.tensor([10, 1, 7, 3, 3, 2])
    # Hand-worked: 0 (10) -> e0; 2 (7) -> e1; 3 (3) -> e1 (7 < 10); 4 (3) -> e0 (tie, lower);
    # 5 (2) -> e1 (10 < 13); 1 (1) -> e1 (12 < 13): loads 13 / 13.
    assert frequency_balanced_table(counts, 2, 1).reshape(-1).tolist() == [0, 1, 1, 1, 0, 1]
    # On a skewed (Zipf) vocabulary the token loads end within the largest single id of the mean.
    zipf = (1000.0 / torch.arange(1, 300)).round()
    table = frequency_balanced_table(zipf, E, 1).reshape(-1)
    load = torch.zeros(E).index_add_(0, table, zipf)
    assert float(load.max() - load.mean()) <= float(zipf.max())
    random_load = torch.zeros(E).index_add_(0, random_balanced_table(299, E, 1, 0).reshape(-1), zipf)
    assert float(load.max() / load.mean()) < float(random_load.max() / random_load.mean())


def test_moe_lm_routes_by_input_id_and_frequency_table_is_built_before_training() -> None:
    model = moe_lm((6,), 20, dim=8, depth=1, heads=2, hidden=8, num_experts=4,
                   routing=MoESettings(router="token_hash_frequency", top_k=1))  # fmt: skip
    ids = torch.tensor([[1, 1, 2, 3, 1, 1], [5, 5, 5, 5, 5, 5]])
    with pytest.raises(RuntimeError, match="hash_balance"):
        model.train()(ids)
    assert balance_token_hash(model, ids) == 1
    router = model.body.layers[0].ffn.router
    assert isinstance(router, TokenHashRouter) and bool(router.frequency_balanced)
    # 5 (6 tokens) and 1 (4 tokens) are the two most frequent ids: different experts
    assert router.table[5, 0] != router.table[1, 0]
    copied = copy.deepcopy(model).eval()  # the copy's hook feeds the copy's routers
    copied(ids)
    rec = copied.body.layers[0].ffn.record
    assert rec is not None and torch.equal(rec.expert_idx, router.table[ids.reshape(-1), 0].long())


def test_mixing_uses_every_bit_of_the_key() -> None:
    # The multiplicative hash mod 8 read only a key's 3 low bits: the LSH used 3 of 16 planes.
    codes = torch.arange(1 << _LSH_BITS)
    expert = _mix(codes, 0) % E
    for bit in range(_LSH_BITS):
        assert bool((expert != _mix(codes ^ (1 << bit), 0) % E).any()), bit
    # position keys are no longer round robin
    pos = HashRouter(4, E, key="position").assign(torch.randn(1, 64, 4))[:, 0]
    assert all(not torch.equal(pos, (torch.arange(64) + s) % E) for s in range(E))


def test_frequency_table_takes_ids_by_falling_frequency() -> None:
    # by frequency: 1 (5) -> e0, 2 (4) -> e1, 0 (1) -> e1 (4 < 5); in id order it would be [0, 1, 0]
    assert frequency_balanced_table(torch.tensor([1, 5, 4]), 2, 1).reshape(-1).tolist() == [1, 0, 1]


def test_router_defaults_and_the_range_of_k() -> None:
    r = TokenHashRouter(4, E, vocab_size=100)
    assert (r.top_k, r.table_kind) == (1, "random") and not bool(r.frequency_balanced)
    assert torch.equal(r.table.long(), random_balanced_table(100, E, 1, seed=0))  # seed 0 by default
    assert TokenHashRouter(4, E).vocab_size == 65536
    assert TokenHashRouter(4, E, top_k=E, vocab_size=10).table.shape == (10, E)  # k = E: every expert
    for k in (0, E + 1):
        with pytest.raises(ValueError, match=rf"^TokenHashRouter: top_k must be in \[1, {E}\], got {k}$"):
            TokenHashRouter(4, E, top_k=k, vocab_size=10)


def test_balance_token_hash_rebalances_only_the_ids_seen_and_refuses_ids_past_the_table() -> None:
    plain = torch.nn.Sequential(TokenHashRouter(4, E, vocab_size=20))
    assert balance_token_hash(plain, torch.tensor([[1, 2]])) == 0  # a random table is not rebalanced
    router = TokenHashRouter(4, E, vocab_size=20, table="frequency")
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), router)
    before = router.table.clone()
    # V' = 1 (only id 0 seen): id 0 is refitted to expert 0, ids 1.. keep their random entries
    assert balance_token_hash(model, torch.zeros(2, 3, dtype=torch.long)) == 1
    assert router.table[0] == 0 and torch.equal(router.table[1:], before[1:]) and bool(router.frequency_balanced)
    assert before[1] != 1  # what a table refitted on ids 0 and 1 would give id 1
    with pytest.raises(ValueError, match=r"^balance_token_hash: ids reach 20, the table covers 20$"):
        balance_token_hash(model, torch.tensor([[3, 20]]))


def test_router_refusals_name_the_router_and_what_to_do() -> None:
    r = TokenHashRouter(4, E, vocab_size=10)
    with pytest.raises(RuntimeError, match=r"^TokenHashRouter: call set_token_ids\(ids\) or feed_token_ids\(model\)$"):
        r(torch.randn(2, 3, 4))  # no ids given yet
    r.set_token_ids(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"^TokenHashRouter: token ids \(2, 3\) do not match input \(2, 4\)$"):
        r(torch.randn(2, 4, 4))
    freq = TokenHashRouter(4, E, vocab_size=10, table="frequency").train()
    freq.set_token_ids(torch.zeros(2, 3, dtype=torch.long))
    message = (
        r"^TokenHashRouter\(table='frequency'\): no frequency table yet; run the hash_balance stage "
        r"\(or balance_token_hash\(model, train_ids\)\) before training$"
    )
    with pytest.raises(RuntimeError, match=message):
        freq(torch.randn(2, 3, 4))


def test_table_buffers_dtype_and_device_and_the_routing_on_the_input_device() -> None:
    """The table is int32 (65536 x k entries, saved with the model), the flag a bool; both on the
    device asked for. The routing lands on the input's device and dtype, with weights 1/k."""
    r = TokenHashRouter(4, E, top_k=2, vocab_size=10)
    assert r.table.dtype == torch.int32 and r.frequency_balanced.dtype == torch.bool
    meta = TokenHashRouter(4, E, vocab_size=10, device="meta")
    assert meta.table.device.type == meta.frequency_balanced.device.type == "meta"
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    r.set_token_ids(ids)
    out = r(torch.randn(2, 3, 4, dtype=torch.float64))
    assert torch.equal(out.expert_idx.view(6, 2), r.table[ids.reshape(-1)].long())
    assert out.weights.dtype == torch.float64 and torch.equal(out.weights, torch.full((12,), 0.5, dtype=torch.float64))
    on_meta = r(torch.randn(2, 3, 4, device="meta"))  # a CPU table and CPU ids, a meta input (FLOP counting)
    assert on_meta.expert_idx.device.type == on_meta.weights.device.type == "meta"


def test_extra_repr_says_which_table_is_in_force() -> None:
    head = f"num_experts={E}, top_k=2, vocab_size=10, table="
    assert TokenHashRouter(4, E, top_k=2, vocab_size=10).extra_repr() == head + "random"
    freq = TokenHashRouter(4, E, top_k=2, vocab_size=10, table="frequency")
    assert freq.extra_repr() == head + "frequency (not built yet)"
    freq.balance_by_frequency(torch.tensor([3, 1, 2]))
    assert freq.extra_repr() == head + "frequency"


def _fmix32(value: int, seed: int) -> int:
    """murmur3's 32-bit finaliser of ``value ^ seed``, in plain Python integers (the reference)."""
    h = (value ^ (seed & 0xFFFFFFFF)) & 0xFFFFFFFF
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def test_mix_is_murmur3_fmix32() -> None:
    values = [0, 1, 2, 7, 65535, 65536, 123456789, 2**31 - 1, 2**32 - 1, 2**40 + 5]
    for seed in (0, 1, 12345, 2**32 + 3):
        got = _mix(torch.tensor(values), seed).tolist()
        assert got == [_fmix32(v, seed) for v in values], seed
    assert _fmix32(1, 0) == 0x514E28B7  # murmur3 fmix32(1), the published value


def test_hash_router_keys_and_assignment_by_hand() -> None:
    """The LSH key is the sign pattern of ``x @ planes`` read as 16 bits (planes drawn from the
    seed); the position key is the index along the sequence; the expert is fmix32(key ^ seed) mod E
    and the next k - 1 experts after it, mod E."""
    d, seed = 4, 5
    r = HashRouter(d, E, top_k=3, key="input", seed=seed)
    planes = torch.randn(d, _LSH_BITS, generator=torch.Generator().manual_seed(seed))
    assert r.planes.dtype == torch.float32 and torch.equal(r.planes, planes)
    x = torch.randn(2, 3, d, generator=torch.Generator().manual_seed(0))
    bits = (x.reshape(6, d) @ planes) > 0
    keys = [sum(1 << i for i in range(_LSH_BITS) if bits[t, i]) for t in range(6)]
    first = torch.tensor([_fmix32(k, seed) % E for k in keys])
    expected = (first[:, None] + torch.arange(3)) % E
    assert torch.equal(r.assign(x), expected)
    assert torch.equal(r(x).expert_idx.view(6, 3), expected)
    pos = HashRouter(d, E, top_k=2, key="position", seed=seed)
    first = torch.tensor([_fmix32(t, seed) % E for t in range(3)])
    assert torch.equal(pos.assign(x), ((first[:, None] + torch.arange(2)) % E).repeat(2, 1))  # (B, T): t per row
    tok = HashRouter(d, E, key="token_id", seed=seed)
    tok.set_token_ids(torch.tensor([[9, 3, 9], [0, 70000, 3]]))
    ids = [9, 3, 9, 0, 70000, 3]
    assert tok.assign(x)[:, 0].tolist() == [_fmix32(i, seed) % E for i in ids]


def test_hash_router_defaults_settings_and_refusals() -> None:
    r = HashRouter(4, E)
    assert (r.top_k, r.key, r.seed, r.needs_token_ids) == (1, "input", 0, False)
    assert torch.equal(r.planes, torch.randn(4, _LSH_BITS, generator=torch.Generator().manual_seed(0)))
    assert r.extra_repr() == f"num_experts={E}, top_k=1, key=input"
    assert HashRouter(4, E, top_k=E).top_k == E and HashRouter(4, E, key="token_id").needs_token_ids
    assert HashRouter(4, E, dtype=torch.float64).planes.dtype == torch.float64
    assert HashRouter(4, E, device="meta").planes.device.type == "meta"
    for k in (0, E + 1):
        with pytest.raises(ValueError, match=rf"^HashRouter: top_k must be in \[1, {E}\], got {k}$"):
            HashRouter(4, E, top_k=k)
    tok = HashRouter(4, E, key="token_id")
    with pytest.raises(
        RuntimeError, match=r"^HashRouter\(key='token_id'\): call set_token_ids\(ids\) or feed_token_ids\(model\)$"
    ):
        tok(torch.randn(2, 3, 4))
    tok.set_token_ids(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"^HashRouter: token ids \(2, 3\) do not match input \(3, 2\)$"):
        tok(torch.randn(3, 2, 4))


def test_hash_router_keys_on_deeper_inputs_zero_inputs_other_dtypes_and_devices() -> None:
    """Positions are counted along dim -2 of any (..., T, D) input; a zero input has every
    projection at 0, which is not positive (key 0); a float64 input meets float32 planes; ids and
    positions land on the input's device."""
    pos = HashRouter(4, E, key="position", seed=2)
    x = torch.randn(2, 3, 5, 4)
    expected = torch.tensor([_fmix32(t, 2) % E for t in range(5)]).repeat(6)
    assert torch.equal(pos.assign(x)[:, 0], expected)
    lsh = HashRouter(4, E, key="input", seed=2)
    assert lsh.assign(torch.zeros(1, 4)).item() == _fmix32(0, 2) % E
    x64 = torch.randn(7, 4, dtype=torch.float64)
    assert torch.equal(lsh.assign(x64), lsh.assign(x64.float()))
    tok = HashRouter(4, E, key="token_id")
    tok.set_token_ids(torch.tensor([[1, 2, 3]]))  # ids on the CPU, the input on the meta device
    assert tok(torch.randn(1, 3, 4, device="meta")).expert_idx.device.type == "meta"


def test_hash_planes_are_float32_draws_whatever_the_default_dtype() -> None:
    """The same seed gives the same hyperplanes, hence the same routing, in a process whose default
    dtype is float64 (a float64 draw consumes the generator differently)."""
    want = HashRouter(4, E, seed=3).planes
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        planes = HashRouter(4, E, seed=3).planes
    finally:
        torch.set_default_dtype(previous)
    assert planes.dtype == torch.float32 and torch.equal(planes, want)


def test_random_table_deals_each_id_the_next_experts_of_its_block() -> None:
    """Id b E + j gets pi[(j + s) mod E] for s < k: its s-th expert is the first expert of the id s
    places further on in its block (cyclically)."""
    table = random_balanced_table(3 * E, E, 3, seed=4)
    for b in range(3):
        for j in range(E):
            for s in range(3):
                assert table[b * E + j, s] == table[b * E + (j + s) % E, 0], (b, j, s)
    assert not torch.equal(table, random_balanced_table(3 * E, E, 3, seed=5))
