"""Bricks: torch-native modules, usable alone with plain PyTorch and no config.

Subpackages: :mod:`~brickwork.nn.routing` (routers, dispatch, expert banks),
:mod:`~brickwork.nn.sparse` (group-to-group wiring and rewiring) and
:mod:`~brickwork.nn.nested` (bricks usable at any prefix width); their main names are
re-exported here too.
"""

from brickwork.nn import nested, routing, sparse
from brickwork.nn.activations import activation
from brickwork.nn.adapters import LoRALinear
from brickwork.nn.attention import MultiHeadAttention
from brickwork.nn.conv import ConvBlock
from brickwork.nn.embed import FlattenEmbed, PatchEmbed, TokenEmbed
from brickwork.nn.ensemble import Ensemble, check_output_space
from brickwork.nn.exits import EarlyExit, ExitAt, ExitGate, ExitRecord, choose_exit
from brickwork.nn.ffn import DenseLayer, FeedForward
from brickwork.nn.heads import ClassifierHead, SentenceClassifier, pool
from brickwork.nn.hooks import after_optimizer_step
from brickwork.nn.masking import PaddingMask
from brickwork.nn.meta import MetaHybrid, ModuleDistillation, Piece
from brickwork.nn.mod import DepthRecord, MixtureOfDepths, mod_transformer_block
from brickwork.nn.modes import evaluating
from brickwork.nn.moe import GatedExpert, MoE, moe_ffn
from brickwork.nn.nested import NestedAttention, NestedConv2d, NestedGroupNorm, NestedLinear, NestedModel
from brickwork.nn.records import (
    AUX_LOSS_DEFAULTS,
    AuxLossDefault,
    aux_weight,
    aux_weights_used,
    collect_aux_losses,
    collect_records,
    weighted_aux_loss,
)
from brickwork.nn.residual import ResidualFFN
from brickwork.nn.routing import (
    DenseToSparseRouter,
    ExpertChoiceRouter,
    ExpertList,
    GroupedFFNExperts,
    HashRouter,
    KeyRouter,
    MLPRouter,
    NoisyTopKRouter,
    Routing,
    RoutingRecord,
    TokenHashRouter,
    TopKRouter,
)
from brickwork.nn.sema import Adapter, Descriptor, SEMALayer, TaskHeads
from brickwork.nn.sparse import GroupConv2d, GroupLinear, LinearAct, Rewiring
from brickwork.nn.stack import Stack, StackModel, stack_of
from brickwork.nn.text import BertEmbed, MeanPoolHead
from brickwork.nn.transformer import PostNormBlock, TransformerBlock

__all__ = [
    "Adapter",
    "AUX_LOSS_DEFAULTS",
    "AuxLossDefault",
    "BertEmbed",
    "ClassifierHead",
    "ConvBlock",
    "DenseLayer",
    "DenseToSparseRouter",
    "DepthRecord",
    "Descriptor",
    "EarlyExit",
    "Ensemble",
    "ExitAt",
    "ExitGate",
    "ExitRecord",
    "ExpertChoiceRouter",
    "ExpertList",
    "FeedForward",
    "FlattenEmbed",
    "GatedExpert",
    "GroupConv2d",
    "GroupLinear",
    "GroupedFFNExperts",
    "HashRouter",
    "KeyRouter",
    "LinearAct",
    "LoRALinear",
    "MLPRouter",
    "MeanPoolHead",
    "MixtureOfDepths",
    "MoE",
    "MultiHeadAttention",
    "NestedAttention",
    "NestedConv2d",
    "NestedGroupNorm",
    "NestedLinear",
    "NestedModel",
    "NoisyTopKRouter",
    "PaddingMask",
    "PatchEmbed",
    "PostNormBlock",
    "ResidualFFN",
    "Rewiring",
    "Routing",
    "RoutingRecord",
    "SEMALayer",
    "SentenceClassifier",
    "Stack",
    "StackModel",
    "TaskHeads",
    "TokenEmbed",
    "TokenHashRouter",
    "TopKRouter",
    "TransformerBlock",
    "activation",
    "after_optimizer_step",
    "check_output_space",
    "aux_weight",
    "aux_weights_used",
    "choose_exit",
    "collect_aux_losses",
    "collect_records",
    "evaluating",
    "mod_transformer_block",
    "moe_ffn",
    "nested",
    "pool",
    "routing",
    "sparse",
    "stack_of",
    "weighted_aux_loss",
    "MetaHybrid",
    "ModuleDistillation",
    "Piece",
]
