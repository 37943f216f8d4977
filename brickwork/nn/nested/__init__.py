"""Nested width and depth: bricks usable at any prefix width, SortedNet and Matryoshka training."""

from brickwork.nn.nested.attention import NestedAttention
from brickwork.nn.nested.functional import sliced_conv2d, sliced_linear, units, zero_written_grads
from brickwork.nn.nested.layers import (
    NestedConv2d,
    NestedGroupNorm,
    NestedLinear,
    nested_classifier_head,
    nested_conv_block,
    nested_dense_layer,
    nested_feed_forward,
    nested_flatten_embed,
)
from brickwork.nn.nested.matryoshka import matryoshka_loss, matryoshka_sizes, prefix
from brickwork.nn.nested.model import NestedModel, Sampling, SubNet, nested_modules, subnet_label

__all__ = [
    "NestedAttention",
    "NestedConv2d",
    "NestedGroupNorm",
    "NestedLinear",
    "NestedModel",
    "Sampling",
    "SubNet",
    "matryoshka_loss",
    "matryoshka_sizes",
    "nested_classifier_head",
    "nested_conv_block",
    "nested_dense_layer",
    "nested_feed_forward",
    "nested_flatten_embed",
    "nested_modules",
    "prefix",
    "sliced_conv2d",
    "sliced_linear",
    "subnet_label",
    "units",
    "zero_written_grads",
]
