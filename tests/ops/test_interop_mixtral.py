"""Mixtral sparse-MoE blocks load into brickwork's MoE and compute the same function."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from brickwork.nn.moe import moe_ffn
from brickwork.nn.routing import MoESettings
from brickwork.ops.interop import load_mixtral_moe, mixtral_layout, moe_from_mixtral

E, D, H, K = 4, 8, 12, 2


def _per_expert_state(seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {"gate.weight": torch.randn(E, D, generator=g)}
    for e in range(E):
        sd[f"experts.{e}.w1.weight"] = torch.randn(H, D, generator=g) * 0.3
        sd[f"experts.{e}.w3.weight"] = torch.randn(H, D, generator=g) * 0.3
        sd[f"experts.{e}.w2.weight"] = torch.randn(D, H, generator=g) * 0.3
    return sd


def _fused_from_per_expert(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    return {
        "gate.weight": sd["gate.weight"],
        "experts.gate_up_proj": torch.stack(
            [torch.cat([sd[f"experts.{e}.w1.weight"], sd[f"experts.{e}.w3.weight"]]) for e in range(E)]
        ),
        "experts.down_proj": torch.stack([sd[f"experts.{e}.w2.weight"] for e in range(E)]),
    }


def _mixtral_reference(sd: dict[str, Tensor], x: Tensor, top_k: int) -> Tensor:
    """The Mixtral block written out token by token: softmax, top-k, renormalise, SwiGLU experts."""
    flat = x.reshape(-1, D)
    probs = torch.softmax(flat @ sd["gate.weight"].t(), dim=-1)
    top_p, top_i = probs.topk(top_k, dim=-1)
    top_p = top_p / top_p.sum(-1, keepdim=True)
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for p, e in zip(top_p[t], top_i[t].tolist(), strict=True):
            w1, w3, w2 = (sd[f"experts.{e}.w{i}.weight"] for i in (1, 3, 2))
            out[t] += p * (w2 @ (F.silu(w1 @ flat[t]) * (w3 @ flat[t])))
    return out.reshape(x.shape)


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_matches_hand_written_mixtral_block(layout: str) -> None:
    sd = _per_expert_state()
    source = sd if layout == "per_expert" else _fused_from_per_expert(sd)
    assert mixtral_layout(source) == layout
    moe = moe_from_mixtral(source, top_k=K).eval()
    x = torch.randn(2, 5, D)
    torch.testing.assert_close(moe(x), _mixtral_reference(sd, x, K))


def test_load_into_existing_moe_and_prefix() -> None:
    sd = {f"model.layers.3.block_sparse_moe.{k}": v for k, v in _per_expert_state(1).items()}
    moe = moe_ffn(D, H, E, MoESettings(top_k=K), act="silu", glu=True)
    load_mixtral_moe(moe, sd, prefix="model.layers.3.block_sparse_moe.")
    x = torch.randn(7, D)
    plain = {k.split("block_sparse_moe.")[1]: v for k, v in sd.items()}
    torch.testing.assert_close(moe.eval()(x), _mixtral_reference(plain, x, K))
    # copies, not views: editing the module leaves the state dict alone
    with torch.no_grad():
        moe.experts.w_in.zero_()
    assert plain["experts.0.w1.weight"].abs().sum() > 0


def test_rejects_incompatible_modules() -> None:
    sd = _per_expert_state()
    with pytest.raises(TypeError):
        load_mixtral_moe(moe_ffn(D, H, E, act="gelu", glu=True), sd)
    with pytest.raises(ValueError):
        load_mixtral_moe(moe_ffn(D, H + 4, E, act="silu", glu=True), sd)
    with pytest.raises(KeyError):
        mixtral_layout({"gate.weight": torch.zeros(E, D)})


def test_matches_transformers_mixtral_block() -> None:
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = transformers.MixtralConfig(
        hidden_size=D, intermediate_size=H, num_local_experts=E, num_experts_per_tok=K, router_jitter_noise=0.0
    )
    torch.manual_seed(0)
    block = MixtralSparseMoeBlock(config).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    moe = moe_from_mixtral(block.state_dict(), top_k=K).eval()
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        expected = block(x.clone())
        expected = expected[0] if isinstance(expected, tuple) else expected
        torch.testing.assert_close(moe(x), expected)
