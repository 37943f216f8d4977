"""A brickwork MoE exports to the Mixtral block layout: export then import is the identity, the
installed transformers' MixtralSparseMoeBlock loads the export strictly and computes the same
function, and MoEs Mixtral cannot express are refused in one line."""

from __future__ import annotations

import pytest
import torch

from brickwork.errors import CheckpointError
from brickwork.nn.moe import MoE, moe_ffn
from brickwork.nn.routing import MoESettings
from brickwork.ops.interop import mixtral_config, mixtral_layout, mixtral_state, moe_from_mixtral

E, D, H, K = 4, 8, 12, 2


def _moe(seed: int = 0, **kw) -> MoE:
    """A float64 Mixtral-form MoE with every weight random."""
    torch.manual_seed(seed)
    kw = {"act": "silu", "glu": True, "bias": False} | kw
    moe = moe_ffn(D, H, E, kw.pop("routing", MoESettings(top_k=K)), dtype=torch.float64, **kw).eval()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.5)
    return moe


@pytest.mark.parametrize("layout", ["fused", "per_expert"])
def test_export_then_import_is_the_identity(layout):
    moe = _moe()
    state = mixtral_state(moe, layout, prefix="model.layers.1.block_sparse_moe.")
    assert mixtral_layout(state, "model.layers.1.block_sparse_moe.") == layout
    back = moe_from_mixtral(state, top_k=K, prefix="model.layers.1.block_sparse_moe.")
    for (name, a), (_, b) in zip(moe.state_dict().items(), back.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    # and import then export gives the same tensors again
    again = mixtral_state(back, layout, prefix="model.layers.1.block_sparse_moe.")
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)
    # copies: editing the export leaves the module alone
    next(iter(state.values())).zero_()
    assert moe.router.proj.weight.abs().sum() > 0


def test_transformers_mixtral_block_loads_the_export_and_agrees():
    transformers = pytest.importorskip("transformers", reason="transformers (the 'interop' extra) is not installed")
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    moe = _moe(1)
    config = transformers.MixtralConfig(**mixtral_config(moe))
    block = MixtralSparseMoeBlock(config).double().eval()
    layout = mixtral_layout(block.state_dict())  # the key names of the installed version
    block.load_state_dict(mixtral_state(moe, layout), strict=True)
    x = torch.randn(2, 5, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    flat = x.reshape(-1, D)
    with torch.no_grad():
        ours = moe(x)
        theirs = block(x.clone())
        theirs = theirs[0] if isinstance(theirs, tuple) else theirs
        # transformers' router takes its softmax in float32 by design (``router_logits.float()``),
        # so the whole block agrees to float32 round-off of the weights only ...
        torch.testing.assert_close(theirs, ours, atol=1e-6, rtol=0)
        # ... and its experts, given the float64 routing, to 1e-10: the expert layout is exact.
        probs = torch.softmax(flat @ moe.router.proj.weight.t(), dim=-1)
        top_p, top_i = probs.topk(K, dim=-1)
        top_p = top_p / top_p.sum(-1, keepdim=True)
        if layout == "fused":
            experts = block.experts(flat, top_i, top_p)
        else:  # transformers < 5: one module per expert
            experts = torch.zeros_like(flat)
            for t in range(flat.shape[0]):
                for p, e in zip(top_p[t], top_i[t].tolist(), strict=True):
                    experts[t] += p * block.experts[e](flat[t : t + 1])[0]
        torch.testing.assert_close(experts.reshape(x.shape), ours, atol=1e-10, rtol=0)
        if layout == "fused":  # the router (logits, weights, indices) picks the same experts
            assert torch.equal(block.gate(flat)[2].sort(-1).values, top_i.sort(-1).values)


@pytest.mark.parametrize(
    ("kw", "why"),
    [
        ({"act": "gelu"}, "act='gelu'"),
        ({"glu": False}, "glu=False"),
        ({"bias": True}, "expert biases"),
        ({"shared_hidden": 6}, "shared expert"),
        ({"routing": MoESettings(top_k=K, router="sigmoid")}, "gate 'sigmoid_topk"),
        ({"routing": MoESettings(top_k=K, capacity_factor=1.25)}, "capacity factor"),
        ({"routing": MoESettings(top_k=K, balance="aux_free")}, "selection bias"),
        ({"routing": MoESettings(top_k=K, router="expert_choice")}, "router ExpertChoice"),
    ],
)
def test_moes_mixtral_cannot_express_are_refused_in_one_line(kw, why):
    moe = _moe(**kw)
    with pytest.raises(CheckpointError, match="Mixtral export: this MoE has") as err:
        mixtral_state(moe)
    assert why in str(err.value) and "\n" not in str(err.value)
