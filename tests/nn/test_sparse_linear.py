"""Group-connected layers equal their masked-dense reference (outputs and gradients), and cost only connected blocks."""

import pytest
import torch
import torch.nn.functional as F

from brickwork.analysis.compute import FlopMeter
from brickwork.nn.sparse import GroupConv2d, GroupLinear, in_degree

pytestmark = pytest.mark.usefixtures("one_torch_thread")


CASES = {
    "random": dict(groups=4, density=0.5),
    "ring, more input groups": dict(groups=4, groups_in=8, density=0.25, pattern="ring"),
    "band, fewer input groups": dict(groups=8, groups_in=4, density=0.5, pattern="band"),
    "ring (banded views both ways)": dict(groups=4, density=0.75, pattern="ring"),
    "band past both ends (gather fallback)": dict(
        groups=4, connectivity=(torch.tensor([[3, 0, 1, 2]]) + torch.arange(4)[:, None]) % 4
    ),
    "small world": dict(groups=4, density=0.5, pattern="small_world", small_world_p=0.5),
    "edge mask": dict(groups=4, density=0.25, edge_density=0.5),
    "input permutation": dict(groups=2, groups_in=4, density=0.75, in_perm=torch.randperm(16)),
    "uneven user matrix": dict(
        groups=4, connectivity=torch.tensor([[1, 1, 0, 0], [0, 0, 1, 0], [1, 1, 1, 1], [0, 1, 0, 0]], dtype=torch.bool)
    ),
}


def reference(layer: GroupLinear, x: torch.Tensor):
    """The masked-dense computation: a dense leaf weight times the 0/1 connectivity mask."""
    w = layer.dense_weight().clone().requires_grad_(True)
    return F.linear(x, w * layer.connectivity_mask(), layer.bias), w


def scatter_grad(layer: GroupLinear, grad: torch.Tensor) -> torch.Tensor:
    """A compressed (G_out, b_out, K) weight gradient as a dense (d_out, d_in) matrix."""
    rows = layer.plan().fwd_rows.view(layer.groups_out, 1, -1).expand_as(layer.weight)
    if layer.mask is not None:
        grad = grad * layer.mask
    dense = torch.zeros(layer.groups_out, layer.block_out, layer.d_in).scatter_(2, rows, grad)
    return dense.view(layer.d_out, layer.d_in)


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_masked_dense_outputs_and_gradients(name):
    layer = GroupLinear(16, 8, **CASES[name])
    x = torch.randn(5, 16, requires_grad=True)
    y = layer(x)
    y_ref, w_ref = reference(layer, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y)
    gx, gw, gb = torch.autograd.grad(y, (x, layer.weight, layer.bias), g)
    gx_ref, gw_ref, gb_ref = torch.autograd.grad(y_ref, (x, w_ref, layer.bias), g)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scatter_grad(layer, gw), gw_ref * layer.connectivity_mask(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gb, gb_ref)


def test_banded_wiring_runs_without_a_gather():
    ring = GroupLinear(16, 16, groups=4, density=0.5, pattern="ring").plan()
    assert ring.fwd_band is not None and ring.bwd_band is not None
    strided = GroupLinear(16, 8, groups=4, groups_in=8, density=0.25, pattern="ring").plan()
    assert strided.fwd_band is not None and strided.bwd_band is None  # step 2: gradient takes the gather


@pytest.mark.parametrize(
    ("kw", "padded"),
    [
        (dict(d_out=8, groups=2, groups_in=4, density=0.5, pattern="band"), False),  # rows 0-15 exactly
        (dict(groups=4, density=0.5, pattern="band"), True),  # runs past the end
        (dict(groups=4, density=0.75, pattern="ring"), True),  # starts before row 0, both ways
        (dict(d_out=8, groups=4, groups_in=8, density=0.25, pattern="ring"), True),  # step 2
        (dict(d_out=8, groups=2, groups_in=4, connectivity=torch.tensor([[1], [3]])), False),  # from row 4
    ],
)
def test_band_views_are_the_gathered_rows_and_copy_nothing_inside_the_rows(kw, padded):
    """A banded wiring's strided view holds exactly the rows the gather would take, forward and
    (when banded) backward; a band that stays inside the rows is a view of the input itself, and
    one that wraps pads cyclically. Batch 5 is neither a block nor the width; the input need not
    start its storage."""
    from brickwork.nn.sparse.kernel import _band_view

    layer = GroupLinear(16, kw.pop("d_out", 16), **kw)
    plan = layer.plan()
    xt = torch.randn(32, 5)[16:]  # contiguous, at a storage offset (the lower half of a larger tensor)
    view = _band_view(xt, plan.fwd_band, plan.groups_out, plan.block_in)
    assert view is not None
    torch.testing.assert_close(view, xt.index_select(0, plan.fwd_rows).view(plan.groups_out, -1, 5), rtol=0, atol=0)
    assert (view.untyped_storage().data_ptr() == xt.untyped_storage().data_ptr()) == (not padded)
    if plan.bwd_band is not None:
        gyt = torch.randn(layer.d_out, 5)
        dy = _band_view(gyt, plan.bwd_band, plan.groups_in, plan.block_out)
        assert dy is not None
        gathered = gyt.index_select(0, plan.bwd_rows).view(plan.groups_in, plan.m * plan.block_out, 5)
        torch.testing.assert_close(dy, gathered, rtol=0, atol=0)


def test_band_starts_need_the_least_cyclic_padding():
    """Every band a plan can hold (forward: start c in [0, G_in), step G_in / G_out; input
    gradient: start -c - k + 1, step 1, for a shifted c) is moved by a multiple of the row count to a start whose
    padding (rows before 0 plus rows past the end) is the least of all its cyclic equivalents."""
    from brickwork.nn.sparse.kernel import Band, _least_padding

    def padding(start: int, rows: int, step: int, width: int, n: int) -> int:
        return max(0, -start) + max(0, start + (rows - 1) * step + width - n)

    bands = []
    for n in (4, 6):
        for g_out in (d for d in range(1, n + 1) if n % d == 0):
            bands += [(Band(c, n // g_out, k), g_out, n) for c in range(n) for k in range(1, n + 1)]
        # c is the forward band's start after this very shift: it may be negative
        bands += [(Band(-c - k + 1, 1, k), n, n) for c in range(1 - n, n) for k in range(1, n + 1)]
    for band, rows, n in bands:
        got = _least_padding(band, rows, n)
        assert (got.step, got.width) == (band.step, band.width) and (got.start - band.start) % n == 0
        least = min(padding(band.start + s * n, rows, band.step, band.width, n) for s in range(-4, 5))
        assert padding(got.start, rows, band.step, band.width, n) == least, (band, rows, n)


def test_stacked_layers_and_token_inputs_match_reference():
    """The second layer reads the first one's transposed-view output; (B, T, D) inputs work."""
    a, b = GroupLinear(12, 8, groups=4, density=0.5), GroupLinear(8, 12, groups=2, groups_in=4, density=0.5)
    x = torch.randn(3, 5, 12, requires_grad=True)
    y = b(torch.relu(a(x)))
    y_ref = reference(b, torch.relu(reference(a, x)[0]))[0]
    assert y.shape == (3, 5, 12)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    (gx_ref,) = torch.autograd.grad(y_ref.square().sum(), x)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)


def test_flops_count_only_connected_blocks():
    layer = GroupLinear(64, 32, groups=8, density=0.25)
    meter = FlopMeter()
    with meter, torch.no_grad():
        layer(torch.randn(10, 64))
    assert meter.total == 2 * 10 * (64 * 32) // 4
    assert layer.density == 0.25


def test_density_is_fraction_of_weights_kept():
    assert GroupLinear(32, 32, groups=8, density=0.25, edge_density=0.5).density == pytest.approx(0.25)
    assert in_degree(0.25, 0.5, 8) == 4
    with pytest.raises(ValueError, match="integer j"):
        GroupLinear(32, 32, groups=8, density=0.3)


def test_loaded_connectivity_rebuilds_the_plan():
    src, dst = GroupLinear(16, 16, groups=4, density=0.5), GroupLinear(16, 16, groups=4, density=0.5)
    x = torch.randn(3, 16)
    dst(x)  # builds a plan for dst's own connectivity first
    dst.load_state_dict(src.state_dict())
    torch.testing.assert_close(dst(x), src(x))


def test_group_conv_matches_dense_conv_with_zeroed_kernel():
    conv = GroupConv2d(8, 12, groups=4, groups_in=4, density=0.5, stride=2)
    x = torch.randn(2, 8, 7, 7, requires_grad=True)
    w = conv.dense_weight().clone().requires_grad_(True)
    y, y_ref = conv(x), F.conv2d(x, w, conv.bias, 2, 1)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    torch.testing.assert_close(
        torch.autograd.grad(y, x, g)[0], torch.autograd.grad(y_ref, x, g)[0], rtol=1e-5, atol=1e-5
    )
    zero = (w == 0).view(12, 8, 9).all(-1)
    assert zero.float().mean() == 0.5  # half of the channel pairs are unconnected


@pytest.mark.parametrize("name", sorted(CASES))
def test_ignores_what_is_stored_behind_the_edge_mask(name):
    """The stored compressed weights may hold anything behind the edge mask (an optimizer with
    weight decay or momentum may put values there): the forward uses only connected edges, and
    those edges alone get a gradient. The reference is a dense matrix times the 0/1 mask, built
    without the layer's own ``dense_weight``."""
    layer = GroupLinear(16, 8, **CASES[name])
    dense = torch.randn(8, 16)
    layer.copy_dense_(dense)
    if layer.mask is not None:
        with torch.no_grad():
            layer.weight.add_(7.0 * ~layer.mask)  # junk behind the mask
    x = torch.randn(5, 16)
    mask = layer.connectivity_mask()
    torch.testing.assert_close(layer(x), F.linear(x, dense * mask, layer.bias), rtol=1e-5, atol=1e-5)
    (gw,) = torch.autograd.grad(layer(x).square().sum(), (layer.weight,))
    if layer.mask is not None:
        assert torch.equal(gw * ~layer.mask, torch.zeros_like(gw))


def test_connectivity_mask_expands_the_user_matrix_block_by_block():
    conn = CASES["uneven user matrix"]["connectivity"]
    layer = GroupLinear(16, 8, groups=4, connectivity=conn)
    expected = torch.kron(conn.long(), torch.ones(2, 4, dtype=torch.long)).bool()  # blocks of 2 x 4
    assert torch.equal(layer.connectivity_mask(), expected)


@pytest.mark.parametrize("frozen", ["no bias", "bias", "weight"])
def test_each_gradient_is_computed_for_what_needs_it(frozen):
    """Without a bias or with it frozen the weight still gets its gradient; with the weight frozen
    the input and the bias still get theirs (a frozen sparse layer inside a trained model)."""
    torch.manual_seed(0)
    layer = GroupLinear(16, 8, groups=4, density=0.5, bias=frozen != "no bias").double()
    if frozen == "bias":
        layer.bias.requires_grad_(False)
    if frozen == "weight":
        layer.weight.requires_grad_(False)
    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 8, dtype=torch.float64)
    w = layer.dense_weight().clone().requires_grad_(frozen != "weight")
    ref = F.linear(x, w, layer.bias)
    leaves = [t for t in (x, layer.weight, layer.bias) if t is not None and t.requires_grad]
    ref_leaves = [x] + ([w] if frozen != "weight" else []) + ([layer.bias] if frozen == "weight" else [])
    got = torch.autograd.grad(layer(x), leaves, g)
    want = torch.autograd.grad(ref, ref_leaves, g)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-12)
    if frozen != "weight":  # the dense gradient at the stored (compressed) positions
        rows = layer.plan().fwd_rows.view(4, 1, -1).expand_as(layer.weight)
        torch.testing.assert_close(got[1], want[1].view(4, 2, 16).gather(2, rows), rtol=0, atol=1e-12)
    else:
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-12)
