"""Bricks: torch-native modules, usable alone with plain PyTorch and no config."""

from brickwork.nn.activations import activation
from brickwork.nn.attention import MultiHeadAttention
from brickwork.nn.conv import ConvBlock
from brickwork.nn.embed import FlattenEmbed, PatchEmbed, TokenEmbed
from brickwork.nn.ffn import DenseLayer, FeedForward
from brickwork.nn.heads import ClassifierHead, pool
from brickwork.nn.records import collect_aux_losses, collect_records, weighted_aux_loss
from brickwork.nn.stack import Stack, StackModel
from brickwork.nn.transformer import TransformerBlock

__all__ = [
    "ClassifierHead",
    "ConvBlock",
    "DenseLayer",
    "FeedForward",
    "FlattenEmbed",
    "MultiHeadAttention",
    "PatchEmbed",
    "Stack",
    "StackModel",
    "TokenEmbed",
    "TransformerBlock",
    "activation",
    "collect_aux_losses",
    "collect_records",
    "pool",
    "weighted_aux_loss",
]
