"""Every registered brick: output shape, finite values, a gradient for every parameter.

Each brick needs an entry in CASES (how to build it small, and an input); a brick registered
without one fails ``test_every_brick_has_a_case``, so no brick goes untested.
"""

from collections.abc import Callable

import pytest
import torch
from torch import nn

from brickwork.experiment.builtins import load_builtins
from brickwork.nn import (
    BertEmbed,
    ClassifierHead,
    ConvBlock,
    DenseLayer,
    FeedForward,
    FlattenEmbed,
    MeanPoolHead,
    MultiHeadAttention,
    PatchEmbed,
    PostNormBlock,
    ResidualFFN,
    TokenEmbed,
    TransformerBlock,
)
from brickwork.nn.mod import MixtureOfDepths, mod_transformer_block
from brickwork.nn.moe import GatedExpert, MoE, moe_ffn
from brickwork.nn.routing import GroupedFFNExperts, MoESettings, TopKRouter
from brickwork.registry import REGISTRY

load_builtins()  # every registered entry, not only those this file's imports happen to register

# name -> (build, input, expected output shape)
Case = tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], tuple[int, ...]]
CASES: dict[str, Case] = {
    "feed_forward": (lambda: FeedForward(8, 16), lambda: torch.randn(2, 5, 8), (2, 5, 8)),
    "dense_layer": (lambda: DenseLayer(8, 6), lambda: torch.randn(3, 8), (3, 6)),
    "attention": (lambda: MultiHeadAttention(8, 2, causal=True), lambda: torch.randn(2, 5, 8), (2, 5, 8)),
    "transformer_block": (
        lambda: TransformerBlock(8, MultiHeadAttention(8, 2), FeedForward(8, 16, glu=True, act="silu")),
        lambda: torch.randn(2, 5, 8),
        (2, 5, 8),
    ),
    "conv_block": (lambda: ConvBlock(3, 4, stride=2), lambda: torch.randn(2, 3, 8, 8), (2, 4, 4, 4)),
    "patch_embed": (lambda: PatchEmbed((1, 8, 8), 6, 4), lambda: torch.randn(2, 1, 8, 8), (2, 4, 6)),
    "token_embed": (lambda: TokenEmbed(11, 6, 7), lambda: torch.randint(0, 11, (2, 7)), (2, 7, 6)),
    "flatten_embed": (lambda: FlattenEmbed(12, 5), lambda: torch.randn(2, 3, 4), (2, 5)),
    "classifier_head": (lambda: ClassifierHead(6, 3, pool="tokens", norm=True), lambda: torch.randn(2, 4, 6), (2, 3)),
    "post_norm_block": (
        lambda: PostNormBlock(8, MultiHeadAttention(8, 2), FeedForward(8, 16)),
        lambda: torch.randn(2, 5, 8),
        (2, 5, 8),
    ),
    "bert_embed": (lambda: BertEmbed(11, 6, max_len=9), lambda: torch.randint(0, 11, (2, 7)), (2, 7, 6)),
    "mean_pool_head": (lambda: MeanPoolHead(normalize=True), lambda: torch.randn(2, 4, 6), (2, 6)),
    "moe_ffn": (
        lambda: moe_ffn(8, 8, num_experts=4, routing=MoESettings(top_k=2), shared_hidden=8),
        lambda: torch.randn(2, 5, 8),
        (2, 5, 8),
    ),
    # Stacked experts take (rows sorted by expert, counts): smoke-tested through the MoE layer.
    "grouped_ffn_experts": (
        lambda: MoE(GroupedFFNExperts(4, 8, 8, glu=True, act="silu"), TopKRouter(8, 4, top_k=1)),
        lambda: torch.randn(6, 8),
        (6, 8),
    ),
    "moe": (
        lambda: MoE([FeedForward(8, 8) for _ in range(3)], TopKRouter(8, 3, top_k=3)),
        lambda: torch.randn(7, 8),
        (7, 8),
    ),
    "gated_expert": (lambda: GatedExpert(FeedForward(8, 16), 8), lambda: torch.randn(3, 8), (3, 8)),
    "residual_ffn": (lambda: ResidualFFN(8, FeedForward(8, 16)), lambda: torch.randn(3, 8), (3, 8)),
    "mixture_of_depths": (
        lambda: MixtureOfDepths(TransformerBlock(8, MultiHeadAttention(8, 2), FeedForward(8, 16)), 8, capacity=0.5),
        lambda: torch.randn(2, 6, 8),
        (2, 6, 8),
    ),
    "mod_transformer_block": (
        lambda: mod_transformer_block(8, 2, 16, capacity=0.5),
        lambda: torch.randn(2, 6, 8),
        (2, 6, 8),
    ),
    "nested_linear": (
        lambda: __import__("brickwork.nn.nested").nn.nested.NestedLinear(8, 6),
        lambda: torch.randn(3, 8),
        (3, 6),
    ),
    "nested_conv2d": (
        lambda: __import__("brickwork.nn.nested").nn.nested.NestedConv2d(3, 4, stride=2),
        lambda: torch.randn(2, 3, 8, 8),
        (2, 4, 4, 4),
    ),
    "nested_group_norm": (
        lambda: __import__("brickwork.nn.nested").nn.nested.NestedGroupNorm(4),
        lambda: torch.randn(2, 4, 3, 3),
        (2, 4, 3, 3),
    ),
    "nested_attention": (
        lambda: __import__("brickwork.nn.nested").nn.nested.NestedAttention(8, 2, causal=True),
        lambda: torch.randn(2, 5, 8),
        (2, 5, 8),
    ),
    "exit_gate": (lambda: __import__("brickwork.nn.exits").nn.exits.ExitGate(), lambda: torch.randn(4, 5), (4,)),
    "group_linear": (
        lambda: REGISTRY.get("brick", "group_linear").obj(8, 6, groups=2, density=0.5, edge_density=0.5),
        lambda: torch.randn(3, 8),
        (3, 6),
    ),
    "group_conv2d": (
        lambda: REGISTRY.get("brick", "group_conv2d").obj(4, 6, groups=2, density=0.5, stride=2),
        lambda: torch.randn(2, 4, 8, 8),
        (2, 6, 4, 4),
    ),
    "linear_act": (
        lambda: REGISTRY.get("brick", "linear_act").obj(
            REGISTRY.get("brick", "group_linear").obj(8, 4, groups=2, density=0.5), act="relu"
        ),
        lambda: torch.randn(3, 8),
        (3, 4),
    ),
}


def test_every_brick_has_a_case():
    missing = set(REGISTRY.names("brick")) - set(CASES)
    assert not missing, f"registered bricks without a smoke case: {sorted(missing)}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_brick_smoke(name):
    build, make_input, shape = CASES[name]
    brick = build()
    x = make_input()
    if x.is_floating_point():
        x.requires_grad_(True)
    y = brick(x)
    assert tuple(y.shape) == shape
    assert torch.isfinite(y).all()
    (y.float() ** 2).mean().backward()
    for pname, p in brick.named_parameters():
        assert p.grad is not None, f"{name}: no gradient for {pname}"
        assert torch.isfinite(p.grad).all()
