"""Model-to-model operations (convert, sparsify, slice, stitch, chain, drop): each says whether it
copies or edits in place, and each has a test that the function it computes is preserved (or
changed exactly as intended).

* :func:`moefy`: dense FFNs into mixtures of neuron experts (MoEfication); :func:`dense_ffn` back.
* :func:`sparsify`: dense linears into group-to-group sparse ones, chosen on data.
* :func:`slice_model`: the sub-network of a nested model at a width and depth.
* :func:`stitch`: the front of one model joined to the back of another by a fitted linear map.
* :class:`ChainModel`, :func:`beam_search_chain`: running a stack's layers in another order.
* :func:`drop_layers`, :func:`drop_attention`: removing whole layers or attention sublayers.
* :func:`align`: permutation alignment (weight / activation matching, REPAIR) from specs the bricks declare.
* :func:`moe_from_mixtral`, :func:`load_mixtral_moe`: Hugging Face Mixtral MoE blocks;
  :func:`mixtral_state`, :func:`mixtral_config`: a brickwork MoE exported to one.
* :func:`merge`, :func:`merge_files`: merging same-architecture models (linear, task arithmetic, TIES,
  DARE, SLERP, Model Stock, Fisher, RegMean), in memory or streamed over safetensors files.
* :func:`deep_model_assembling`, :func:`module_to_module_kd`: modules trained one by one inside a
  shared meta model, then assembled (Deep Model Assembling; m2mKD).
"""

from brickwork.ops.align import (
    activation_matching,
    align,
    repair,
    weight_matching,
)
from brickwork.ops.assemble import (
    AssembleError,
    assemble,
    boundaries,
    divide,
    fit_module,
    fitted_modules,
    meta_hybrid,
    module_shapes,
    split_model,
)
from brickwork.ops.chain import (
    ChainModel,
    beam_search_chain,
    drop_attention,
    drop_layers,
    enumerate_chains,
    layer_importance,
    least_important,
    mcts_chain,
    mcts_cheapest_chain,
    mcts_search,
    per_sample_oracle,
)
from brickwork.ops.interop import load_mixtral_moe, mixtral_config, mixtral_state, moe_from_mixtral
from brickwork.ops.layerwise import (
    add_lora,
    append_layer,
    compose_like,
    grow_layers_like,
    linear_paths,
    set_trainable_,
    specialists,
)
from brickwork.ops.merge import MergeOptions, fisher_diagonal, gram_matrices, merge, merge_state_dicts
from brickwork.ops.merge_files import merge_files
from brickwork.ops.moefy import dense_ffn, moe_layers, moefy, moefy_like, set_top_k
from brickwork.ops.permutation import (
    Axis,
    Perm,
    PermutationSpec,
    Probe,
    flat_perm,
    invert,
    permutation_spec,
    permute,
    random_perms,
)
from brickwork.ops.slice import slice_error, slice_model
from brickwork.ops.sparsify import apply_sparsify, plan_sparsify, sparsify, sparsify_like
from brickwork.ops.stitch import StitchLayer, stitch, stitched

__all__ = [
    "Axis",
    "ChainModel",
    "MergeOptions",
    "Perm",
    "PermutationSpec",
    "Probe",
    "StitchLayer",
    "activation_matching",
    "add_lora",
    "align",
    "append_layer",
    "apply_sparsify",
    "beam_search_chain",
    "compose_like",
    "dense_ffn",
    "drop_attention",
    "drop_layers",
    "enumerate_chains",
    "fisher_diagonal",
    "flat_perm",
    "gram_matrices",
    "grow_layers_like",
    "invert",
    "layer_importance",
    "least_important",
    "linear_paths",
    "load_mixtral_moe",
    "mcts_chain",
    "mcts_cheapest_chain",
    "mcts_search",
    "merge",
    "merge_files",
    "merge_state_dicts",
    "mixtral_config",
    "mixtral_state",
    "moe_from_mixtral",
    "moe_layers",
    "moefy",
    "moefy_like",
    "per_sample_oracle",
    "permutation_spec",
    "permute",
    "plan_sparsify",
    "random_perms",
    "repair",
    "set_top_k",
    "set_trainable_",
    "slice_error",
    "slice_model",
    "sparsify",
    "sparsify_like",
    "specialists",
    "stitch",
    "stitched",
    "weight_matching",
    "AssembleError",
    "assemble",
    "boundaries",
    "divide",
    "fit_module",
    "fitted_modules",
    "meta_hybrid",
    "module_shapes",
    "split_model",
]
