"""Bricks: torch-native modules, usable alone with plain PyTorch and no config."""

from brickwork.nn import nested  # noqa: E402  (nested bricks; imports the ones above)
from brickwork.nn.activations import activation
from brickwork.nn.attention import MultiHeadAttention
from brickwork.nn.conv import ConvBlock
from brickwork.nn.embed import FlattenEmbed, PatchEmbed, TokenEmbed
from brickwork.nn.exits import EarlyExit, ExitGate  # noqa: E402
from brickwork.nn.ffn import DenseLayer, FeedForward
from brickwork.nn.heads import ClassifierHead, pool
from brickwork.nn.hooks import after_optimizer_step
from brickwork.nn.masking import PaddingMask
from brickwork.nn.records import collect_aux_losses, collect_records, weighted_aux_loss
from brickwork.nn.residual import ResidualFFN
from brickwork.nn.sparse import GroupConv2d, GroupLinear, LinearAct, Rewiring
from brickwork.nn.stack import Stack, StackModel
from brickwork.nn.text import BertEmbed, MeanPoolHead
from brickwork.nn.transformer import PostNormBlock, TransformerBlock

__all__ = [
    "BertEmbed",
    "ClassifierHead",
    "ConvBlock",
    "DenseLayer",
    "EarlyExit",
    "ExitGate",
    "FeedForward",
    "FlattenEmbed",
    "GroupConv2d",
    "GroupLinear",
    "LinearAct",
    "MeanPoolHead",
    "MultiHeadAttention",
    "PaddingMask",
    "PatchEmbed",
    "PostNormBlock",
    "ResidualFFN",
    "Rewiring",
    "Stack",
    "StackModel",
    "TokenEmbed",
    "TransformerBlock",
    "activation",
    "after_optimizer_step",
    "nested",
    "collect_aux_losses",
    "collect_records",
    "pool",
    "weighted_aux_loss",
]
