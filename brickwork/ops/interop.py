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
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor

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
