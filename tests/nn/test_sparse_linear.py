"""Group-connected layers equal their masked-dense reference (outputs and gradients), and cost only connected blocks."""

import pytest
import torch
import torch.nn.functional as F

from brickwork.analysis.compute import FlopMeter
from brickwork.nn.sparse import GroupConv2d, GroupLinear, block_sparse_linear, in_degree

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


class _Timer:
    """Runs each candidate (as a real timer does) and reports seconds from a table."""

    def __init__(self, seconds: dict[str, float]) -> None:
        self.seconds, self.calls = seconds, []

    def __call__(self, name: str, fn) -> float:
        self.calls.append(name)
        fn()
        return self.seconds[name]


@pytest.mark.parametrize("bias", [True, False])
def test_the_auto_path_times_each_candidate_on_the_calls_own_operands_outside_its_graph(monkeypatch, tmp_path, bias):
    """Unpinned, with a table timer: the shape class is (batch bucket, d_in, d_out, G_in, G_out, k,
    banded) in the call's dtype and pass; every applicable path runs as the real call would (same
    plan, the operands' storage as new leaves, forward and backward when autograd records, the bias
    if any) and the fastest is chosen; the caller's tensors get no gradient. Calls under the
    tuner's FLOP floor, inside a compiled region and under a FLOP counter are not timed."""
    from brickwork.analysis.compute import FlopMeter
    from brickwork.kernels import autotune
    from brickwork.nn.sparse import kernel

    monkeypatch.delenv("BRICKWORK_BACKEND")
    torch.manual_seed(0)
    layer = GroupLinear(16, 8, groups=2, groups_in=4, density=0.5, pattern="band", bias=bias).double()
    plan = layer.plan()
    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    flops = 2 * 5 * layer.weight.numel()
    seen = []
    real = kernel.block_sparse_linear

    def spy(xs, ws, bs, p, path="auto"):
        seen.append((path, p is plan, xs.data_ptr() == x.data_ptr(), ws.data_ptr() == layer.weight.data_ptr()))
        seen[-1] += (xs.requires_grad, ws.requires_grad, None if bs is None else (bs.requires_grad, bs is layer.bias))
        y = real(xs, ws, bs, p, path=path)
        if y.requires_grad:
            y.register_hook(lambda g: seen.append(("backward", bool((g == 1).all()))))
        return y

    monkeypatch.setattr(kernel, "block_sparse_linear", spy)
    timer = _Timer({"band": 2.0, "gather": 3.0, "dense": 1.0})
    for floor, timed in ((flops + 1, False), (flops, True)):
        tuner = autotune.Autotuner(tmp_path / f"{floor}.json", timer=timer, min_flops=floor)
        monkeypatch.setattr(autotune, "TUNER", tuner)
        choice = kernel.tuned_sparse_path(x, layer.weight, layer.bias, plan)
        assert (choice, tuner.timings) == (("dense", 1) if timed else ("band", 0))
    ((key, shape),) = tuner.shapes.items()
    assert shape == autotune.ShapeClass("sparse", (8, 16, 8, 4, 2, 2, 1), "float64", "fwd+bwd", "cpu"), key
    assert set(timer.calls) == {"band", "gather", "dense"} and x.grad is None and layer.weight.grad is None
    calls = [s for s in seen if s[0] != "backward"]
    assert {c[0] for c in calls} == {"band", "gather", "dense"} and len(seen) == 2 * len(calls)
    b = (True, False) if bias else None
    assert all(c[1:] == (True, True, True, True, True, b) for c in calls)
    assert all(s == ("backward", True) for s in seen if s[0] == "backward")
    seen.clear()
    monkeypatch.setattr(autotune, "TUNER", autotune.Autotuner(tmp_path / "via.json", timer=timer, min_flops=0))
    real(x, layer.weight, layer.bias, plan)  # path "auto": the layer's own call hands its bias to the timing
    assert seen and all(c[6] == b for c in seen if c[0] != "backward")
    seen.clear()
    tuner = autotune.Autotuner(tmp_path / "fwd.json", timer=timer, min_flops=0)
    monkeypatch.setattr(autotune, "TUNER", tuner)
    with torch.no_grad():
        assert kernel.tuned_sparse_path(x, layer.weight, layer.bias, plan) == "dense"
        assert list(tuner.shapes.values())[0].mode == "fwd" and all(not s[4] and not s[5] for s in seen)
        with FlopMeter():
            kernel.tuned_sparse_path(torch.randn(64, 16, dtype=torch.float64), layer.weight, layer.bias, plan)
    assert tuner.timings == 1  # the call under the FLOP counter took the first path, untimed
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert kernel.tuned_sparse_path(x, layer.weight, layer.bias, plan) == "band"
    other = GroupLinear(16, 8, groups=2, groups_in=4, density=0.5, connectivity=torch.tensor([[0, 2], [1, 3]]))
    assert kernel.tuned_sparse_path(x.float(), other.weight, other.bias, other.plan()) == "gather"


def test_banded_paths_gather_nothing_the_plan_is_cached_and_only_needed_tensors_are_kept():
    """The band path runs forward and backward on strided views (no ``index_select``), the gather
    path gathers; the plan is built once per wiring; a feature-major view is read without a copy;
    with the weight frozen the gathered input is not kept for the backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from brickwork.nn.sparse.kernel import _rows

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    layer = GroupLinear(16, 16, groups=4, density=0.5, pattern="ring")
    plan = layer.plan()
    assert plan.fwd_band is not None and plan.bwd_band is not None and layer.plan() is plan
    x = torch.randn(5, 16, requires_grad=True)
    for path, gathers in (("band", False), ("gather", True)):
        ops = Ops()
        with ops:
            block_sparse_linear(x, layer.weight, layer.bias, plan, path).sum().backward()
        assert ("index_select" in ops.names) == gathers, path
    assert layer.plan() is plan  # nothing changed: the same plan
    with torch.no_grad():
        layer.sources[0, 0] = (layer.sources[0, 0] + 2) % 4
    assert layer.plan() is not plan
    xt = torch.randn(16, 5)
    assert _rows(xt.t()).data_ptr() == xt.data_ptr() and _rows(xt).shape == (5, 16)
    layer = GroupLinear(16, 16, groups=4, density=0.5)
    kept: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept.append(id(t))
        return t

    for frozen in (False, True):
        layer.weight.requires_grad_(not frozen)
        kept.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            block_sparse_linear(x, layer.weight, layer.bias, layer.plan(), "gather")
        assert len(kept) == (1 if frozen else 2)  # the weight alone; else also the gathered input


def test_plans_of_permuted_bands_unread_groups_and_single_output_groups():
    """A band read through an input permutation is not a band of the stored order (it must gather);
    an input group nobody reads (here the last one, with a single output group) gets a zero
    gradient through a padded slot; the plan's m, padding flag and inverse permutation say what
    the wiring needs and no more."""
    torch.manual_seed(0)
    cases = [
        GroupLinear(16, 16, groups=4, density=0.5, pattern="ring", in_perm=torch.randperm(16)),
        GroupLinear(8, 4, groups=1, groups_in=2, connectivity=torch.tensor([[0]])),
        GroupLinear(16, 16, groups=4, density=0.25, pattern="block_diagonal"),
    ]
    for layer in cases:
        x = torch.randn(5, layer.d_in, requires_grad=True)
        y = layer(x)
        y_ref, _ = reference(layer, x)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
        g = torch.randn_like(y)
        torch.testing.assert_close(
            torch.autograd.grad(y, x, g)[0], torch.autograd.grad(y_ref, x, g)[0], rtol=1e-5, atol=1e-6
        )
    permuted, unread, diagonal = (layer.plan() for layer in cases)
    assert permuted.fwd_band is None and permuted.inv_perm is not None
    assert (unread.m, unread.padded) == (1, True) and unread.inv_perm is None
    assert (diagonal.m, diagonal.padded, diagonal.inv_perm) == (1, False, None)


def test_group_linear_defaults_messages_device_and_dtype():
    torch.manual_seed(0)
    default = GroupLinear(64, 64)
    assert (default.groups_out, default.groups_in, default.k, default.density) == (16, 16, 4, 0.25)
    torch.manual_seed(1)
    a = GroupLinear(16, 16, groups=8, density=0.25, pattern="small_world")
    torch.manual_seed(1)
    assert a.sources.equal(
        GroupLinear(16, 16, groups=8, density=0.25, pattern="small_world", small_world_p=0.1).sources
    )
    ring = GroupLinear(16, 16, groups=8, density=0.25, pattern="small_world", small_world_p=0.0)
    assert ring.sources.equal(
        torch.tensor([[0, 7], [0, 1], [1, 2], [2, 3], [3, 4], [4, 5], [5, 6], [6, 7]])
    )  # rows sorted
    assert not GroupLinear(16, 16, groups=8, density=0.25, pattern="small_world", small_world_p=1.0).sources.equal(
        ring.sources
    )
    for kw, message in (
        (
            {"connectivity": torch.tensor([[0, 0], [1, 2], [2, 3], [3, 0]])},
            "an output group lists the same input group twice",
        ),
        ({"in_perm": torch.zeros(16, dtype=torch.long)}, "in_perm is not a permutation of range(d_in)"),
    ):
        with pytest.raises(ValueError) as err:
            GroupLinear(16, 8, groups=4, density=0.5, **kw)
        assert str(err.value) == f"group_linear: {message}"
    meta = GroupLinear(16, 8, groups=4, density=0.5, device="meta", dtype=torch.float64)
    assert meta.bias is not None
    for t in (meta.weight, meta.bias, meta.sources, meta.in_perm):
        assert t.device.type == "meta"
    assert meta.weight.dtype == meta.bias.dtype == torch.float64
