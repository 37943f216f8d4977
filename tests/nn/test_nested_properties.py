"""Nested bricks, the general cases: in-place sliced gradients with frozen or absent biases and
frozen weights, initialisation at the full fan-in, every argument of a sliced copy, the
sampling rules, Matryoshka weights and the errors each builder gives (issue 18's mutation run)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from brickwork.models.nested import nested_mlp
from brickwork.nn.nested import (
    NestedAttention,
    NestedConv2d,
    NestedGroupNorm,
    NestedLinear,
    NestedModel,
    matryoshka_loss,
    matryoshka_sizes,
    nested_classifier_head,
    nested_conv_block,
    nested_dense_layer,
    nested_feed_forward,
    nested_flatten_embed,
    nested_modules,
    prefix,
    sliced_conv2d,
    subnet_label,
    units,
)
from brickwork.nn.nested.layers import _swap

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _brick(kind: str, bias: bool) -> nn.Module:
    if kind == "linear":
        return NestedLinear(12, 10, bias=bias, dtype=torch.float64)
    if kind == "conv":
        return NestedConv2d(5, 6, stride=2, bias=bias, dtype=torch.float64)
    return NestedAttention(12, 4, bias=bias, dtype=torch.float64)


def _input(kind: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    shape = {"linear": (3, 12), "conv": (2, 5, 6, 6), "attention": (2, 4, 12)}[kind]
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def _step(module: nn.Module, kind: str, inplace: bool, width_in: bool) -> tuple[torch.Tensor, dict]:
    """x's gradient and the parameters' ``.grad`` after two sub-networks (widths 0.5, 0.8) in one step."""
    module.zero_grad(set_to_none=True)
    module.inplace_grad = inplace
    x = _input(kind).requires_grad_(True)
    for w in (0.5, 0.8):
        module.width = w
        xi = x[:, : units(w, x.shape[1])] if width_in else x  # a nested input dimension
        module(xi).square().sum().backward()
    return x.grad, {n: p.grad for n, p in module.named_parameters()}


@pytest.mark.parametrize("kind", ["linear", "conv", "attention"])
@pytest.mark.parametrize("case", ["no bias", "frozen bias", "frozen weight"])
def test_inplace_gradients_equal_autograd_with_frozen_or_absent_parameters(kind, case):
    """The in-place backward gives x and every trainable parameter autograd's gradient (float64,
    exact), and a frozen parameter no gradient at all: not a zero tensor, nothing."""
    torch.manual_seed(0)
    module = _brick(kind, bias=case != "no bias")
    frozen = {"frozen bias": "bias", "frozen weight": "weight"}.get(case)
    for name, p in module.named_parameters():
        if frozen and name.endswith(frozen):
            p.requires_grad_(False)
    width_in = kind != "attention"
    gx_ref, g_ref = _step(module, kind, inplace=False, width_in=width_in)
    gx, g = _step(module, kind, inplace=True, width_in=width_in)
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=1e-10)
    for name, p in module.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(g[name], g_ref[name], rtol=0, atol=1e-10, msg=name)
        else:
            assert g[name] is None, name


def test_sliced_linear_with_a_frozen_input_gives_weight_gradients_only():
    """x without a gradient (a first layer): the weights' in-place gradient equals autograd's."""
    torch.manual_seed(0)
    module = NestedLinear(12, 10, dtype=torch.float64)
    x = _input("linear")
    grads = []
    for inplace in (False, True):
        module.zero_grad(set_to_none=True)
        module.inplace_grad = inplace
        module.width = 0.5
        module(x[:, :6]).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in module.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=1e-10)


def test_nested_linear_and_attention_start_as_nn_linear_does():
    """Initialised as ``nn.Linear`` at the full fan-in (Kaiming uniform, a = sqrt(5): bound
    1/sqrt(fan_in) for weights and bias); the attention's biases start at zero."""
    torch.manual_seed(3)
    ref = nn.Linear(12, 10, dtype=torch.float64)
    torch.manual_seed(3)
    lin = NestedLinear(12, 10, dtype=torch.float64)
    assert torch.equal(lin.weight, ref.weight) and torch.equal(lin.bias, ref.bias)
    torch.manual_seed(3)
    qkv = nn.Linear(12, 36, bias=False)
    out = nn.Linear(12, 12, bias=False)
    torch.manual_seed(3)
    att = NestedAttention(12, 4)
    assert torch.equal(att.qkv_weight, qkv.weight) and torch.equal(att.out_weight, out.weight)
    assert not att.qkv_bias.any() and not att.out_bias.any()
    # A bound taken at the full fan-in, not at a slice's: some weight comes close to it.
    assert float(lin.weight.detach().abs().max()) > 0.8 / math.sqrt(12)


def test_units_rounds_half_up_and_refuses_widths_outside_zero_one():
    assert [units(w, n) for w, n in ((1.0, 7), (0.5, 3), (0.3, 5), (0.1, 4), (0.7, 10))] == [7, 2, 2, 1, 7]
    for bad in (1.5, 1.0001, -0.2):
        with pytest.raises(ValueError, match="width must be in"):
            units(bad, 4)


def test_matryoshka_sizes_keep_the_positive_sizes_below_the_full_one():
    assert matryoshka_sizes([0, 1, 4, 8, 12, 4], 8) == [1, 4, 8]
    assert matryoshka_sizes([], 5) == [5]


def test_matryoshka_loss_weights_each_prefix_by_its_weight():
    """``sum_m c_m L_m / sum_m c_m`` in float64 with unequal weights; a wrong count is refused."""
    torch.manual_seed(0)
    head = NestedLinear(8, 3, nest_out=False, dtype=torch.float64)
    h, y = torch.randn(5, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 0])
    c = [0.1, 0.3, 0.6]
    losses = [F.cross_entropy(head(h[:, :m]), y) for m in (2, 4, 8)]
    expected = sum(ci * li for ci, li in zip(c, losses, strict=True)) / sum(c)
    got = matryoshka_loss(h, head, y, F.cross_entropy, [2, 4], weights=c)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="2 weights for sizes"):
        matryoshka_loss(h, head, y, F.cross_entropy, [2, 4], weights=[0.5, 0.5])


def test_matryoshka_on_feature_maps_takes_channel_prefixes():
    """On (B, C, H, W) the features are the channels: prefixes cut C, and the full size is C."""
    torch.manual_seed(0)
    head = nested_classifier_head(6, 3, pool="spatial").double()
    h, y = torch.randn(2, 6, 3, 5, dtype=torch.float64), torch.tensor([2, 0])
    assert prefix(h, 4).shape == (2, 4, 3, 5) and prefix(h[:, 0], 2).shape == (2, 3, 2)
    expected = sum(F.cross_entropy(head(h[:, :m]), y) for m in (2, 4, 6)) / 3
    got = matryoshka_loss(h, head, y, F.cross_entropy, [2, 4, 10])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def _mlp(**kw) -> NestedModel:
    return nested_mlp((1, 4, 4), 3, width=8, depth=3, **kw).double()


def test_nested_model_sorts_its_subnetworks_and_refuses_bad_settings():
    model = _mlp(widths=[0.5, 1.0, 0.5, 0.25], depths=[1, 3, 1])
    assert model.widths == [1.0, 0.5, 0.25] and model.depths == [3, 1]
    assert model.subnetworks() == [(1.0, 3), (1.0, 1), (0.5, 3), (0.5, 1), (0.25, 3), (0.25, 1)]
    assert _mlp().depths == [3] and (_mlp().width, _mlp().depth) == (1.0, 3)
    assert [subnet_label(w, d) for w, d in ((0.5, 2), (1.0, 3), (0.125, 1))] == ["w0.5-d2", "w1-d3", "w0.125-d1"]
    for bad in ({"widths": [0.0]}, {"widths": [1.2]}, {"depths": [0]}, {"depths": [4]}, {"samples": 0}):
        with pytest.raises(ValueError, match="NestedModel"):
            _mlp(**bad)
    NestedModel(model, widths=[1.0], depths=[1, 3], samples=1)  # the edges of each range are accepted
    for width, depth in ((0.0, 3), (1.5, 3), (0.5, 0)):
        with pytest.raises(ValueError, match="configure"):
            model.configure(width, depth)


def test_nested_model_at_a_depth_runs_the_first_layers_only():
    torch.manual_seed(0)
    model = _mlp(depths=[1, 2, 3])
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    for w in (0.5, 1.0):
        for d in (1, 2, 3):
            with model.at(w, d):
                h = model.stem(x)
                for layer in list(model.body.layers)[:d]:
                    h = layer(h)
                torch.testing.assert_close(model.hidden(x), h, rtol=0, atol=1e-12)
                torch.testing.assert_close(model(x), model.head(h), rtol=0, atol=1e-12)
    model.configure(0.5, 2)
    model.configure(0.25)  # depth omitted: the full depth
    assert (model.width, model.depth) == (0.25, 3)
    assert all(m.width == 0.25 for m in nested_modules(model))
    assert sum(1 for _ in nested_modules(model)) == 5  # the embedding, three layers and the head


def test_sampling_rules():
    """``all``: every sub-network; ``random``: ``samples`` distinct ones; ``sandwich``: the largest
    and the smallest plus random others; always sorted, largest first."""
    torch.manual_seed(0)
    widths = [0.25, 0.5, 0.75, 1.0]
    full = _mlp(widths=widths, depths=[2, 3], sampling="all", samples=2)
    assert full.sample() == full.subnetworks()
    rand = _mlp(widths=widths, depths=[2, 3], sampling="random", samples=3)
    seen = set()
    for _ in range(20):
        s = rand.sample()
        assert len(s) == 3 and s == sorted(s, reverse=True) and set(s) <= set(rand.subnetworks())
        seen.update(s)
    assert seen == set(rand.subnetworks())  # any sub-network, the ends included
    sandwich = _mlp(widths=widths, depths=[2, 3], sampling="sandwich", samples=3)
    middle = set()
    for _ in range(40):
        s = sandwich.sample()
        assert len(s) == 3 and s[0] == (1.0, 3) and s[-1] == (0.25, 2) and s == sorted(s, reverse=True)
        middle.add(s[1])
    assert middle == set(sandwich.subnetworks()[1:-1])  # every other sub-network is drawn, the ends never twice
    two = _mlp(widths=widths, sampling="sandwich", samples=2)
    assert two.sample() == [(1.0, 3), (0.25, 3)]
    one = _mlp(widths=widths, sampling="sandwich", samples=1)
    assert one.sample() == [(1.0, 3)]
    few = _mlp(widths=[0.5, 1.0], sampling="random", samples=2)  # as many sub-networks as samples
    assert few.sample() == [(1.0, 3), (0.5, 3)]


def test_training_loss_without_grad_is_the_mean_of_the_subnetwork_losses():
    torch.manual_seed(0)
    model = _mlp(widths=[0.5, 1.0], depths=[2, 3], sampling="all")
    x, y = torch.randn(4, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    expected = 0.0
    for w, d in model.subnetworks():
        with model.at(w, d):
            expected = expected + F.cross_entropy(model(x), y) / 4
    with torch.no_grad():
        got = model.training_loss(x, y, F.cross_entropy)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())


def _same_as_supernet(brick: nn.Module, x_at, widths=(0.25, 0.5, 0.75, 1.0)) -> None:
    """``brick.sliced(w)`` computes what ``brick`` computes at width ``w`` (float64, exactly)."""
    for w in widths:
        brick.width = w
        x = x_at(w)
        torch.testing.assert_close(brick.sliced(w)(x), brick(x), rtol=0, atol=1e-12)
    brick.width = 1.0


def test_sliced_copies_keep_every_setting():
    torch.manual_seed(0)
    lin = NestedLinear(8, 6, bias=False, nest_in=False, inplace_grad=False, dtype=torch.float64)
    small = lin.sliced(0.5)
    assert (small.in_features, small.out_features, small.bias) == (8, 3, None)
    assert (small.nest_in, small.nest_out, small.inplace_grad) == (False, True, False)
    assert small.weight.dtype == torch.float64
    assert lin.active(0.5) == (3, 8) and NestedLinear(8, 6, nest_out=False).active(0.5) == (6, 4)
    assert repr(lin) == "NestedLinear(8, 6, nest_in=False, nest_out=True)"
    _same_as_supernet(lin, lambda w: torch.randn(2, 8, dtype=torch.float64))

    conv = NestedConv2d(4, 6, kernel_size=5, stride=2, padding=2, bias=False, nest_out=False, dtype=torch.float64)
    small = conv.sliced(0.5)
    assert (small.c_in, small.c_out, small.kernel_size, small.stride, small.padding) == (2, 6, 5, 2, 2)
    assert (small.bias, small.nest_in, small.nest_out, small.weight.dtype) == (None, True, False, torch.float64)
    assert conv.active(0.5) == (6, 2) and NestedConv2d(4, 6, nest_in=False).active(0.5) == (3, 4)
    _same_as_supernet(conv, lambda w: torch.randn(2, units(w, 4), 7, 7, dtype=torch.float64))

    norm = NestedGroupNorm(6, eps=0.5, dtype=torch.float64)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(norm(x), F.group_norm(x, 1, norm.weight[:3], norm.bias[:3], 0.5), rtol=0, atol=1e-12)
    assert norm.sliced(0.5).eps == 0.5 and norm.sliced(0.5).weight.dtype == torch.float64


def test_nested_attention_settings_heads_and_slices():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="not divisible by heads"):
        NestedAttention(10, 4)
    att = NestedAttention(10, 4, head_dim=3, bias=False, causal=True, inplace_grad=False, dtype=torch.float64)
    assert att.qkv_weight.shape == (36, 10) and att.out_weight.shape == (10, 12) and att.qkv_bias is None
    assert [att.active_heads(w) for w in (0.25, 0.5, 1.0)] == [1, 2, 4] and att.active_heads() == 4
    small = att.sliced(0.5)
    assert (small.dim, small.heads, small.head_dim, small.causal, small.inplace_grad) == (10, 2, 3, True, False)
    assert small.qkv_bias is None and small.out_bias is None and small.qkv_weight.dtype == torch.float64
    assert repr(att) == "NestedAttention(dim=10, heads=4, head_dim=3, causal=True)"
    _same_as_supernet(att, lambda w: torch.randn(2, 5, 10, dtype=torch.float64))
    open_ = NestedAttention(8, 2, dtype=torch.float64)  # not causal: the future is seen
    x = torch.randn(1, 3, 8, dtype=torch.float64)
    y = open_(x)
    x2 = x.clone()
    x2[:, -1] += 1.0
    assert not torch.allclose(open_(x2)[:, 0], y[:, 0])
    assert NestedAttention(8, 2, causal=True).sliced(1.0).causal


def test_nested_attention_drops_attention_only_while_training():
    torch.manual_seed(0)
    att = NestedAttention(8, 2, dropout=0.5, dtype=torch.float64)
    ref = NestedAttention(8, 2, dtype=torch.float64)
    ref.load_state_dict(att.state_dict())
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    att.eval()
    torch.testing.assert_close(att(x), ref(x), rtol=0, atol=1e-12)
    att.train()
    assert not torch.allclose(att(x), ref(x))
    assert att.sliced(0.5).dropout == 0.5


def test_nested_builders_slice_what_they_should():
    """The FFN's hidden width is nested (the first neurons), its model width is not; the dense
    layer keeps its activation and dropout; a conv block is built as asked or refused."""
    torch.manual_seed(0)
    ffn = nested_feed_forward(6, 8, act="relu", glu=True, bias=False).double()
    assert ffn.up.nest_in is False and ffn.down.nest_out is False and ffn.gate.nest_in is False
    assert ffn.up.bias is None and ffn.gate.bias is None and ffn.down.bias is None
    x = torch.randn(3, 6, dtype=torch.float64)
    for m in nested_modules(ffn):
        m.width = 0.5
    h = 4
    manual = F.linear(F.relu(F.linear(x, ffn.up.weight[:h])) * F.linear(x, ffn.gate.weight[:h]), ffn.down.weight[:, :h])
    torch.testing.assert_close(ffn(x), manual, rtol=0, atol=1e-12)
    plain = nested_feed_forward(6, 8)
    assert plain.gate is None and plain.drop.p == 0.0 and plain.up.bias is not None and plain.down.bias is not None
    assert nested_feed_forward(6, 8, dropout=0.25).drop.p == 0.25

    dense = nested_dense_layer(6, 4, act="relu", dropout=0.25)
    x = torch.randn(5, 6)
    assert dense.drop.p == 0.25 and torch.equal(dense.eval()(x), F.relu(dense.linear(x)))
    assert (dense.linear.in_features, dense.linear.out_features, dense.linear.nest_in) == (6, 4, True)
    embed = nested_flatten_embed(12, 5)
    assert (embed.proj.in_features, embed.proj.out_features, embed.proj.nest_in) == (12, 5, False)
    head = nested_classifier_head(5, 3)
    assert (head.proj.in_features, head.proj.out_features, head.proj.nest_out, head.pool) == (5, 3, False, "none")

    block = nested_conv_block(3, 4, stride=2, norm="none", nest_in=False)
    assert block.conv.bias is not None and isinstance(block.norm, nn.Identity)
    assert (block.conv.c_in, block.conv.c_out, block.conv.stride, block.conv.padding, block.conv.nest_in) == (
        3,
        4,
        2,
        1,
        False,
    )
    grouped = nested_conv_block(3, 4)
    assert grouped.conv.bias is None and grouped.norm.channels == 4 and grouped.conv.nest_in
    assert grouped.conv.kernel_size == 3 and grouped.conv.stride == 1
    why = "not 'batch': batch statistics differ per width [(]slimmable networks need one BatchNorm per width[)]"
    with pytest.raises(ValueError, match=f"support norm 'group' or 'none', {why}"):
        nested_conv_block(3, 4, norm="batch")
    with pytest.raises(AttributeError, match="no sub-module 'proj'"):
        _swap(nn.Sequential(), proj=nn.Identity())


def test_matryoshka_on_token_states_takes_prefixes_of_the_last_dimension():
    """On (B, T, D) the features are D (not T): prefixes cut D, and the full size is D."""
    torch.manual_seed(0)
    head = nested_classifier_head(6, 3, pool="tokens").double()
    h, y = torch.randn(2, 4, 6, dtype=torch.float64), torch.tensor([1, 2])
    expected = sum(F.cross_entropy(head(h[..., :m]), y) for m in (2, 5, 6)) / 3
    got = matryoshka_loss(h, head, y, F.cross_entropy, [2, 5])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_training_loss_backpropagates_all_but_the_last_subnetwork_itself():
    """One graph alive at a time (SortedNet's gradient accumulation): when ``training_loss``
    returns, ``.grad`` already holds the gradient of every sub-network but the last, and the
    returned loss's graph adds exactly the last one's."""
    torch.manual_seed(0)
    model = _mlp(widths=[0.25, 0.5, 1.0], sampling="all")
    x, y = torch.randn(4, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    model.zero_grad(set_to_none=True)
    loss = model.training_loss(x, y, F.cross_entropy)
    early = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    for m in nested_modules(model):
        m.inplace_grad = False
    ref = 0.0
    for w, d in model.subnetworks()[:-1]:
        with model.at(w, d):
            ref = ref + F.cross_entropy(model(x), y) / 3
    ref.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(early[n], p.grad, rtol=0, atol=1e-12, msg=n)
    assert loss.requires_grad


def test_training_loss_in_bfloat16_accumulates_in_float32_and_returns_the_loss_dtype():
    """The sub-network losses already backpropagated are summed in float32 (bfloat16 keeps 8
    bits: 1/n-scaled losses lose digits when added there), and the result has the loss's dtype."""
    torch.manual_seed(0)
    widths = [0.25, 0.5, 0.75, 1.0]
    model = nested_mlp((1, 4, 4), 3, width=8, depth=3, widths=widths, depths=[1, 2, 3], sampling="all")
    model = model.to(torch.bfloat16)
    x, y = torch.randn(4, 1, 4, 4, dtype=torch.bfloat16), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        losses = []
        for w, d in model.subnetworks():
            with model.at(w, d):
                losses.append(F.cross_entropy(model(x), y) / 12)
        got = model.training_loss(x, y, F.cross_entropy)
    done = torch.zeros((), dtype=torch.float32)
    for loss in losses[:-1]:
        done = done + loss
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, losses[-1] + done.to(torch.bfloat16))


def test_defaults_are_the_standard_layers():
    """Left at their defaults, the nested bricks are nn.Linear / a 3x3 'same' nn.Conv2d with bias /
    non-causal attention without dropout, nested on both sides, with in-place sliced gradients."""
    torch.manual_seed(0)
    conv = NestedConv2d(4, 6)
    assert (conv.kernel_size, conv.stride, conv.padding, conv.nest_in, conv.nest_out, conv.inplace_grad) == (
        3,
        1,
        1,
        True,
        True,
        True,
    )
    assert conv.weight.shape == (6, 4, 3, 3) and {n for n, _ in conv.named_parameters()} == {"weight", "bias"}
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, 1, 1))
    lin = NestedLinear(4, 6)
    assert (lin.nest_in, lin.nest_out, lin.inplace_grad) == (True, True, True) and lin.bias is not None
    att = NestedAttention(8, 2)
    assert (att.head_dim, att.causal, att.dropout, att.inplace_grad) == (4, False, 0.0, True)
    assert att.qkv_bias is not None and att.out_bias is not None
    assert NestedGroupNorm(4).eps == 1e-5


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_inplace_grad_chooses_where_the_weight_gradient_goes(kind):
    """The documented contract of :mod:`brickwork.nn.nested.functional`: at a partial width in grad
    mode, ``inplace_grad=True`` writes the weight gradient into ``.grad`` and returns none through
    autograd (``torch.autograd.grad`` and data-parallel wrappers do not see it); with
    ``inplace_grad=False`` or at full width the plain op runs, whose gradient autograd returns."""

    def through_autograd(module: nn.Module, width: float, make_x) -> bool:
        module.zero_grad(set_to_none=True)
        module.width = width
        (g,) = torch.autograd.grad(module(make_x(width)).sum(), [module.weight], allow_unused=True)
        return g is not None

    if kind == "linear":
        module, make_x = NestedLinear(6, 4), (lambda w: torch.randn(2, units(w, 6)))
    else:
        module, make_x = NestedConv2d(4, 6), (lambda w: torch.randn(1, units(w, 4), 3, 3))
    module.inplace_grad = True
    assert not through_autograd(module, 0.5, make_x)
    assert through_autograd(module, 1.0, make_x)
    module.inplace_grad = False
    assert through_autograd(module, 0.5, make_x)
    narrow = NestedLinear(6, 4, nest_in=False) if kind == "linear" else NestedConv2d(4, 6, nest_in=False)
    with pytest.raises(RuntimeError):  # an input dimension that is not nested needs all its units
        narrow(make_x(0.5))


def test_nested_dense_layer_defaults_to_gelu_without_dropout():
    dense = nested_dense_layer(6, 4)
    x = torch.randn(3, 6)
    assert dense.drop.p == 0.0 and torch.equal(dense.train()(x), F.gelu(dense.linear(x)))


def test_bricks_and_the_matryoshka_loss_stay_on_the_device_asked_for():
    """Built with ``device=`` every parameter is there, and the Matryoshka weights follow the
    losses' device (the meta device stands in for an accelerator: no CPU tensor may appear)."""
    meta = torch.device("meta")
    bricks = [NestedConv2d(4, 6, device=meta), NestedGroupNorm(4, device=meta), NestedLinear(4, 6, device=meta)]
    bricks.append(NestedAttention(8, 2, device=meta))
    assert all(p.device == meta for b in bricks for p in b.parameters())
    head = NestedLinear(8, 3, nest_out=False, device=meta)
    h, y = torch.randn(5, 8, device=meta), torch.zeros(5, dtype=torch.long, device=meta)
    assert matryoshka_loss(h, head, y, F.cross_entropy, [2, 4], weights=[1.0, 2.0, 3.0]).device == meta


def test_the_inplace_path_also_runs_with_a_frozen_or_absent_bias_or_weight():
    """The in-place path is chosen whenever the weight *or* the bias tracks a gradient (the rule
    of ``_tracks_grad``), and it is ``sliced_conv2d``'s default: a gradient it produces never
    comes back through autograd."""
    x = torch.randn(1, 2, 3, 3)
    weight, bias = torch.randn(6, 4, 3, 3, requires_grad=True), torch.randn(6, requires_grad=True)
    y = sliced_conv2d(x, weight, None, 3, 2, 1, 1)  # default inplace_grad, no bias
    assert torch.autograd.grad(y.sum(), [weight], allow_unused=True) == (None,) and weight.grad is not None
    frozen_w = weight.detach()
    y = sliced_conv2d(x, frozen_w, bias, 3, 2, 1, 1)  # only the bias is trained
    assert torch.autograd.grad(y.sum(), [bias], allow_unused=True) == (None,)
    torch.testing.assert_close(bias.grad[:3], torch.full((3,), 9.0))  # 3x3 outputs per channel
    frozen_b = bias.detach()
    weight.grad = None
    y = sliced_conv2d(x, weight, frozen_b, 3, 2, 1, 1)  # only the weight is trained
    assert torch.autograd.grad(y.sum(), [weight], allow_unused=True) == (None,) and weight.grad is not None
