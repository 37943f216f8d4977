"""Function-preserving growth: wider layers, deeper stacks, more heads, more experts, upcycled MoEs.

Every operation returns a grown **copy** unless told ``in_place=True``, and each has a test over
randomly generated brick models that the grown model computes the same function in float64
(within 1e-10; bit-exact where the new weights start at zero).
"""

from brickwork.ops.grow.depth import deepen, identity_block, residual_ffn_block, zero_output_
from brickwork.ops.grow.experts import ExpertMode, add_experts, chosen_new, split_expert
from brickwork.ops.grow.heads import add_heads, as_nested_attention, grow_heads_
from brickwork.ops.grow.recipe import GrowOp, GrowSettings, apply_grow, replay_grow
from brickwork.ops.grow.residual import widen_residual
from brickwork.ops.grow.units import WidthMode
from brickwork.ops.grow.upcycle import ffn_slices, reproduce_dense_, upcycle, upcycle_ffn, upcycle_like, upcycle_recipe
from brickwork.ops.grow.width import widen_ffn, widen_layers

__all__ = [
    "ExpertMode",
    "GrowOp",
    "GrowSettings",
    "WidthMode",
    "add_experts",
    "add_heads",
    "apply_grow",
    "as_nested_attention",
    "chosen_new",
    "deepen",
    "ffn_slices",
    "grow_heads_",
    "identity_block",
    "replay_grow",
    "reproduce_dense_",
    "residual_ffn_block",
    "split_expert",
    "upcycle",
    "upcycle_ffn",
    "upcycle_like",
    "upcycle_recipe",
    "widen_ffn",
    "widen_layers",
    "widen_residual",
    "zero_output_",
]
