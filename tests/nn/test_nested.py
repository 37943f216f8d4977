"""Nested bricks: in-place sliced gradients equal autograd's, full width equals the standard
bricks, SortedNet's accumulated gradient equals the mean of its sub-networks' gradients."""

import pytest
import torch
import torch.nn.functional as F

from brickwork.models import cnn, mlp
from brickwork.models.nested import nested_cnn, nested_mlp
from brickwork.nn import MultiHeadAttention
from brickwork.nn.nested import (
    NestedAttention,
    NestedConv2d,
    NestedGroupNorm,
    NestedLinear,
    NestedModel,
    matryoshka_loss,
    nested_modules,
    prefix,
    sliced_linear,
    units,
    zero_written_grads,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_units_rounds_half_up_within_bounds():
    assert [units(w, 10) for w in (0.01, 0.25, 0.5, 1.0)] == [1, 3, 5, 10]
    with pytest.raises(ValueError):
        units(0.0, 4)


def _grads(module, make_input, widths, inplace):
    module.zero_grad(set_to_none=True)
    x = make_input().requires_grad_(True)
    module.inplace_grad = inplace
    for w in widths:  # two sub-networks in one step: gradients accumulate
        module.width = w
        module(x).square().sum().backward()
    return x.grad, {n: p.grad.clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_inplace_sliced_gradients_equal_autograd_through_views(kind):
    torch.manual_seed(0)
    if kind == "linear":
        module, make = NestedLinear(12, 10), (lambda: torch.ones(3, 12).cumsum(1) / 12)
    else:
        module, make = NestedConv2d(5, 6, stride=2), (lambda: torch.linspace(-1, 1, 2 * 5 * 6 * 6).view(2, 5, 6, 6))
    gx_a, g_a = _grads(module, make, [0.5, 0.8], inplace=False)
    gx_b, g_b = _grads(module, make, [0.5, 0.8], inplace=True)
    torch.testing.assert_close(gx_a, gx_b)
    for name in g_a:
        torch.testing.assert_close(g_a[name], g_b[name])
    assert g_b["weight"][-1].abs().sum() == 0  # the last output row is in neither sub-network


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_kept_gradients_zeroed_by_prefix_equal_fresh_autograd_over_steps(kind):
    """Steps at shrinking, growing and full widths (full width accumulates through autograd, which
    writes all of .grad), the buffers kept and zeroed by zero_written_grads between steps: every
    step's gradients equal a fresh autograd computation through views (float64, 1e-10)."""
    torch.manual_seed(0)
    kw = {"dtype": torch.float64}
    if kind == "linear":
        module, make = NestedLinear(12, 10, **kw), (lambda: torch.randn(3, 12, dtype=torch.float64))
    else:
        module = NestedConv2d(5, 6, stride=2, **kw)
        make = lambda: torch.randn(2, 5, 6, 6, dtype=torch.float64)  # noqa: E731
    reference = NestedLinear(12, 10, **kw) if kind == "linear" else NestedConv2d(5, 6, stride=2, **kw)
    reference.load_state_dict(module.state_dict())
    reference.inplace_grad = False
    for widths in ([0.8], [0.3], [1.0, 0.3], [0.5], [0.7, 0.3], [0.2]):
        x = make()
        zero_written_grads(module.parameters())
        reference.zero_grad(set_to_none=True)
        for m in (module, reference):
            for w in widths:
                m.width = w
                m(x).square().sum().backward()
        for (name, p), q in zip(module.named_parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-10, msg=f"{name} after widths {widths}")


def test_sliced_linear_without_grad_is_a_view_product():
    w, b = torch.randn(6, 4), torch.randn(6)
    x = torch.randn(2, 3)
    torch.testing.assert_close(sliced_linear(x, w, b, 5, 3), F.linear(x, w[:5, :3], b[:5]))


def test_nested_models_at_full_width_are_the_standard_models():
    x = torch.randn(4, 1, 8, 8)
    pairs = [
        (nested_mlp((1, 8, 8), 5, width=16, depth=2), mlp((1, 8, 8), 5, width=16, depth=2)),
        (nested_cnn((1, 8, 8), 5, channels=(4, 8)), cnn((1, 8, 8), 5, channels=(4, 8), norm="group")),
    ]
    for nested, plain in pairs:
        plain.load_state_dict(nested.state_dict())  # same parameter names and shapes
        nested.eval()
        plain.eval()
        torch.testing.assert_close(nested(x), plain(x))


def test_nested_attention_at_full_width_is_multi_head_attention():
    torch.manual_seed(0)
    d, h = 12, 3
    nested, mha = NestedAttention(d, h, causal=True), MultiHeadAttention(d, h, causal=True)
    # Head-major rows [h0: q k v, h1: ...] vs MultiHeadAttention's [q: h0 h1 .., k .., v ..].
    perm = torch.arange(3 * d).view(3, h, d // h).transpose(0, 1).reshape(-1)
    with torch.no_grad():
        nested.qkv_weight.copy_(mha.qkv.weight[perm])
        nested.qkv_bias.copy_(mha.qkv.bias[perm])
        nested.out_weight.copy_(mha.out.weight)
        nested.out_bias.copy_(mha.out.bias)
    x = torch.randn(2, 5, d)
    torch.testing.assert_close(nested(x), mha(x))
    nested.width = 0.34  # one head: only the first head's rows and the first out columns matter
    with torch.no_grad():
        nested.qkv_weight[3 * d // h :] = float("nan")
        nested.out_weight[:, d // h :] = float("nan")
    assert torch.isfinite(nested(x)).all()


def test_configure_sets_every_nested_brick_and_validates():
    model = nested_mlp((1, 8, 8), 5, width=16, depth=3, depths=[1, 3])
    model.configure(0.5, 1)
    assert all(m.width == 0.5 for m in nested_modules(model))
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 5)
    with model.at(0.25, 3):
        assert model.width == 0.25
    assert (model.width, model.depth) == (0.5, 1)
    with pytest.raises(ValueError):
        model.configure(0.5, 4)
    with pytest.raises(ValueError):
        NestedModel(model, widths=[1.5])


def test_sampling_is_sorted_and_sandwiched():
    model = nested_mlp(
        (1, 8, 8), 5, width=16, depth=3, widths=[0.25, 0.5, 0.75, 1.0], depths=[2, 3], sampling="sandwich", samples=4
    )
    subnets = model.subnetworks()
    assert subnets == sorted(subnets, reverse=True) and len(subnets) == 8
    for _ in range(5):
        s = model.sample()
        assert len(s) == 4 and s == sorted(s, reverse=True)
        assert s[0] == (1.0, 3) and s[-1] == (0.25, 2)


def test_sortednet_accumulated_gradient_is_the_mean_of_the_subnetworks():
    torch.manual_seed(0)
    model = nested_mlp((1, 8, 8), 5, width=12, depth=2, widths=[0.5, 1.0], depths=[1, 2], sampling="all")
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 5, (6,))
    model.zero_grad(set_to_none=True)
    loss = model.training_loss(x, y, F.cross_entropy)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    ref = 0.0
    for w, d in model.subnetworks():
        with model.at(w, d):
            ref = ref + F.cross_entropy(model(x), y) / 4
    for m in nested_modules(model):
        m.inplace_grad = False
    ref.backward()
    torch.testing.assert_close(loss.detach(), ref.detach())
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, msg=n)
    assert (model.width, model.depth) == (1.0, 2)  # training leaves the full setting


def test_matryoshka_loss_is_the_mean_over_nested_prefixes():
    torch.manual_seed(0)
    model = nested_mlp((1, 8, 8), 5, width=16, depth=1, widths=[1.0], matryoshka=[4, 8, 32])
    x, y = torch.randn(3, 1, 8, 8), torch.randint(0, 5, (3,))
    h = model.hidden(x)
    manual = sum(F.cross_entropy(model.head(prefix(h, m)), y) for m in (4, 8, 16)) / 3
    torch.testing.assert_close(matryoshka_loss(h, model.head, y, F.cross_entropy, [4, 8, 32]), manual)
    torch.testing.assert_close(model.training_loss(x, y, F.cross_entropy), manual)


WIDTHS = (0.2, 0.25, 1 / 3, 0.5, 0.7, 1.0)


def _random_norm(channels: int) -> NestedGroupNorm:
    norm = NestedGroupNorm(channels, dtype=torch.float64)
    with torch.no_grad():  # not the ones/zeros init, so a wrong slice of the affine shows
        norm.weight.normal_()
        norm.bias.normal_()
    return norm


BRICKS = {
    "linear": (lambda: NestedLinear(12, 10, dtype=torch.float64), lambda w: torch.randn(3, units(w, 12))),
    "linear, input not nested": (
        lambda: NestedLinear(12, 10, nest_in=False, dtype=torch.float64),
        lambda w: torch.randn(3, 12),
    ),
    "conv": (lambda: NestedConv2d(6, 8, dtype=torch.float64), lambda w: torch.randn(2, units(w, 6), 5, 5)),
    "group norm": (lambda: _random_norm(8), lambda w: torch.randn(2, units(w, 8), 3, 3)),
    "attention": (lambda: NestedAttention(12, 4, causal=True, dtype=torch.float64), lambda w: torch.randn(2, 5, 12)),
}


@pytest.mark.parametrize("name", sorted(BRICKS))
def test_sliced_brick_equals_the_supernet_at_every_width(name):
    """``sliced(w)`` is a standalone brick with smaller copied parameters whose output equals the
    supernet's at width ``w`` (float64, exact up to round-off), and which leaves the supernet alone."""
    torch.manual_seed(0)
    make, inputs = BRICKS[name]
    brick = make()
    full = sum(p.numel() for p in brick.parameters())
    before = {k: v.clone() for k, v in brick.state_dict().items()}
    for w in WIDTHS:
        x = inputs(w).double()
        brick.width = w
        ref = brick(x)
        small = brick.sliced(w)
        assert type(small) is type(brick) and small.width == 1.0
        torch.testing.assert_close(small(x), ref, rtol=0, atol=1e-12)
        if w < 0.5:
            assert sum(p.numel() for p in small.parameters()) < full
        with torch.no_grad():
            for p in small.parameters():
                p.add_(1.0)  # a copy: the supernet does not change
        assert all(torch.equal(before[k], v) for k, v in brick.state_dict().items())
