"""Interoperability with Hugging Face checkpoints: Mixtral-style sparse MoE blocks.

A Mixtral sparse MoE block (Jiang et al., 2024) is: router ``gate.weight`` (E, D), logits
``x W_g^T``, softmax over the E experts in fp32, top-k, the k probabilities renormalised to
sum to 1; each expert a SwiGLU FFN ``w2(silu(w1 x) * w3 x)`` (w1 the gate projection, w3 the
up projection, w2 the down projection, no biases); the output the weighted sum of the chosen
experts. This is brickwork's :class:`~brickwork.nn.moe.MoE` with a
:class:`~brickwork.nn.routing.topk.TopKRouter` (``gate="softmax_topk_renorm"``) and
:class:`~brickwork.nn.routing.experts.GroupedFFNExperts` (``act="silu", glu=True``).

Two checkpoint layouts exist and both are read, recognised by their keys:

* per expert (transformers < 5): ``experts.{i}.w1.weight`` (H, D), ``experts.{i}.w3.weight``
  (H, D), ``experts.{i}.w2.weight`` (D, H);
* fused (transformers >= 5): ``experts.gate_up_proj`` (E, 2H, D), gate rows first, and
  ``experts.down_proj`` (E, D, H).

Both copy weights (the returned or edited module shares no storage with the state dict).

Export is the inverse: :func:`mixtral_state` writes a brickwork MoE as a Mixtral block's state
dict in either layout (``load_state_dict`` of transformers' ``MixtralSparseMoeBlock`` takes it),
:func:`mixtral_config` the config fields it needs. Only what a Mixtral block computes can be
exported: a bias-free softmax top-k router with renormalised weights, no selection bias or
learned noise, dropless, no shared expert, bias-free SwiGLU experts; anything else is refused
with one line naming the obstacle (a MoEfied BERT, for one, has GELU experts with biases).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor

from brickwork.errors import CheckpointError
from brickwork.kernels import GroupedBackend
from brickwork.nn.moe import MoE, moe_ffn
from brickwork.nn.routing import GroupedFFNExperts, MoESettings, TopKRouter

MixtralLayout = Literal["per_expert", "fused"]


def mixtral_layout(state_dict: Mapping[str, Tensor], prefix: str = "") -> MixtralLayout:
    """Which Mixtral expert layout ``state_dict`` uses (keys under ``prefix``)."""
    if f"{prefix}experts.gate_up_proj" in state_dict:
        return "fused"
    if f"{prefix}experts.0.w1.weight" in state_dict:
        return "per_expert"
    raise KeyError(f"mixtral_layout: no Mixtral expert weights under prefix {prefix!r}")


def _mixtral_tensors(state_dict: Mapping[str, Tensor], prefix: str) -> tuple[Tensor, Tensor, Tensor]:
    """(router (E, D), w_in (E, D, 2H) with [gate | up] columns, w_out (E, H, D))."""
    router = state_dict[f"{prefix}gate.weight"]
    num_experts, dim = router.shape
    if mixtral_layout(state_dict, prefix) == "fused":
        gate_up = state_dict[f"{prefix}experts.gate_up_proj"]
        down = state_dict[f"{prefix}experts.down_proj"]
        if gate_up.shape[0] != num_experts or gate_up.shape[2] != dim or down.shape[:2] != (num_experts, dim):
            raise ValueError(
                f"Mixtral fused experts: gate_up_proj {tuple(gate_up.shape)} / down_proj {tuple(down.shape)} "
                f"do not match router {tuple(router.shape)} (expected (E, 2H, D) and (E, D, H))"
            )
        return router, gate_up.transpose(1, 2), down.transpose(1, 2)
    w_in, w_out = [], []
    for e in range(num_experts):
        w1 = state_dict[f"{prefix}experts.{e}.w1.weight"]  # gate projection (H, D), gets SiLU
        w3 = state_dict[f"{prefix}experts.{e}.w3.weight"]  # up projection (H, D)
        w2 = state_dict[f"{prefix}experts.{e}.w2.weight"]  # down projection (D, H)
        w_in.append(torch.cat([w1.t(), w3.t()], dim=1))
        w_out.append(w2.t())
    return router, torch.stack(w_in), torch.stack(w_out)


def load_mixtral_moe(moe: MoE, state_dict: Mapping[str, Tensor], prefix: str = "") -> MoE:
    """Copy a Mixtral sparse-MoE block's weights into an existing ``moe`` (in place).

    ``moe`` must have a bias-free :class:`TopKRouter` with ``gate="softmax_topk_renorm"`` and a
    bias-free SwiGLU :class:`GroupedFFNExperts` of matching sizes.

    Returns:
        ``moe`` itself, edited in place.
    """
    router, w_in, w_out = _mixtral_tensors(state_dict, prefix)
    r, ex = moe.router, moe.experts
    if not isinstance(r, TopKRouter) or r.gate != "softmax_topk_renorm" or r.proj.bias is not None:
        raise TypeError("load_mixtral_moe: the router must be a bias-free TopKRouter(gate='softmax_topk_renorm')")
    if not isinstance(ex, GroupedFFNExperts) or not ex.glu or ex.act_name != "silu" or ex.b_in is not None:
        raise TypeError("load_mixtral_moe: the experts must be bias-free GroupedFFNExperts(act='silu', glu=True)")
    if r.proj.weight.shape != router.shape or ex.w_in.shape != w_in.shape or ex.w_out.shape != w_out.shape:
        raise ValueError(
            f"load_mixtral_moe: sizes differ: router {tuple(router.shape)}, w_in {tuple(w_in.shape)}, "
            f"w_out {tuple(w_out.shape)} vs the module's {tuple(r.proj.weight.shape)}, "
            f"{tuple(ex.w_in.shape)}, {tuple(ex.w_out.shape)}"
        )
    with torch.no_grad():
        r.proj.weight.copy_(router)
        ex.w_in.copy_(w_in)
        ex.w_out.copy_(w_out)
    return moe


def moe_from_mixtral(
    state_dict: Mapping[str, Tensor],
    top_k: int = 2,
    prefix: str = "",
    backend: GroupedBackend = "auto",
) -> MoE:
    """A new dropless :class:`MoE` computing the same function as a Mixtral sparse-MoE block.

    Args:
        state_dict: the block's weights (either layout), keys under ``prefix``
            (e.g. ``"model.layers.0.block_sparse_moe."`` in a full Mixtral checkpoint).
        top_k: experts per token (``num_experts_per_tok`` in the Mixtral config).
        prefix: key prefix of the block.
        backend: grouped-matmul backend of the experts.

    Returns:
        A copy; it shares no storage with ``state_dict``.
    """
    router, w_in, w_out = _mixtral_tensors(state_dict, prefix)
    num_experts, dim = router.shape
    # Mixtral's block is moe_ffn's default router (softmax, top-k, renormalised, no bias) over
    # bias-free SwiGLU experts: build it the one way, then copy the weights in.
    moe = moe_ffn(
        dim,
        w_out.shape[1],
        num_experts,
        MoESettings(top_k=top_k),
        act="silu",
        glu=True,
        bias=False,
        backend=backend,
        device=router.device,
        dtype=router.dtype,
    )
    return load_mixtral_moe(moe, state_dict, prefix)


def _exportable(moe: MoE) -> tuple[TopKRouter, GroupedFFNExperts]:
    """``moe``'s router and experts once every part has a Mixtral form; else one line saying which does not."""
    if not isinstance(moe, MoE):
        raise CheckpointError(f"Mixtral export: a {type(moe).__name__} is not a MoE")
    r, ex = moe.router, moe.experts
    why = ""
    if not isinstance(r, TopKRouter):
        why = f"router {type(r).__name__} (Mixtral routes by softmax top-k: a TopKRouter)"
    elif r.gate not in ("softmax_topk_renorm", "topk_softmax"):  # the two are equal in value
        why = f"router gate {r.gate!r} (Mixtral renormalises the top-k softmax: 'softmax_topk_renorm')"
    elif r.proj.bias is not None:
        why = "a router bias (Mixtral's gate is a bias-free linear layer)"
    elif r.selection_bias is not None:
        why = "a router selection bias (balance_rate > 0; Mixtral selects by probability alone)"
    elif r.noise not in ("none", "jitter"):
        why = f"router noise {r.noise!r} (Mixtral has only multiplicative jitter)"
    elif moe.shared is not None:
        why = "a shared expert (a Mixtral block has routed experts only)"
    elif moe.capacity_factor is not None:
        why = f"capacity factor {moe.capacity_factor} (Mixtral is dropless)"
    elif not isinstance(ex, GroupedFFNExperts):
        why = f"experts {type(ex).__name__} (Mixtral's are stacked FFNs: GroupedFFNExperts)"
    elif not ex.glu or ex.act_name != "silu":
        why = f"experts act={ex.act_name!r} glu={ex.glu} (Mixtral's experts are SwiGLU: act='silu', glu=True)"
    elif ex.b_in is not None or ex.b_out is not None:
        why = "expert biases (Mixtral's experts have none)"
    if why:
        raise CheckpointError(f"Mixtral export: this MoE has {why}")
    return r, ex  # type: ignore[return-value]  # both checked just above


def mixtral_config(moe: MoE) -> dict[str, object]:
    """The ``MixtralConfig`` fields of the block :func:`mixtral_state` writes (sizes, top-k, activation)."""
    r, ex = _exportable(moe)
    return {
        "hidden_size": ex.dim,
        "intermediate_size": ex.hidden,
        "num_local_experts": ex.num_experts,
        "num_experts_per_tok": r.top_k,
        "hidden_act": "silu",
        "router_jitter_noise": r.noise_scale if r.noise == "jitter" else 0.0,
    }


def mixtral_state(moe: MoE, layout: MixtralLayout = "fused", prefix: str = "") -> dict[str, Tensor]:
    """A Mixtral sparse-MoE block's state dict computing what ``moe`` computes (export).

    The inverse of :func:`moe_from_mixtral`: importing the result gives ``moe``'s weights back exactly.

    Args:
        moe: a MoE of Mixtral's form (see the module docstring); refused otherwise.
        layout: ``"fused"`` (transformers >= 5: ``experts.gate_up_proj`` (E, 2H, D),
            ``experts.down_proj`` (E, D, H)) or ``"per_expert"`` (``experts.{i}.w1/w3/w2.weight``).
        prefix: prepended to every key (e.g. ``"model.layers.0.block_sparse_moe."``).

    Returns:
        Contiguous copies (no storage shared with ``moe``).

    Raises:
        CheckpointError: ``moe`` has a part Mixtral cannot express (one line naming it).
    """
    r, ex = _exportable(moe)
    h = ex.hidden
    w_in, w_out = ex.w_in.detach(), ex.w_out.detach()  # (E, D, 2H) [gate | up], (E, H, D)
    out = {f"{prefix}gate.weight": r.proj.weight.detach()}
    if layout == "fused":
        out[f"{prefix}experts.gate_up_proj"] = w_in.transpose(1, 2)
        out[f"{prefix}experts.down_proj"] = w_out.transpose(1, 2)
    else:
        for e in range(ex.num_experts):
            out[f"{prefix}experts.{e}.w1.weight"] = w_in[e, :, :h].t()  # gate projection, gets SiLU
            out[f"{prefix}experts.{e}.w3.weight"] = w_in[e, :, h:].t()  # up projection
            out[f"{prefix}experts.{e}.w2.weight"] = w_out[e].t()  # down projection
    return {k: v.contiguous().clone() for k, v in out.items()}
