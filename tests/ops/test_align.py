"""Permutation specs from the bricks, planted-permutation recovery (weights and activations), REPAIR."""

import copy

import pytest
import torch
from torch import nn

from brickwork.analysis import interpolate
from brickwork.errors import BrickworkError
from brickwork.models.cnn import cnn
from brickwork.models.mlp import mlp
from brickwork.models.moe import moe_lm, moe_mlp
from brickwork.models.sparse_mlp import sparse_mlp
from brickwork.models.transformers import transformer_lm, vit
from brickwork.ops import (
    Axis,
    Perm,
    PermutationSpec,
    align,
    flat_perm,
    invert,
    permutation_spec,
    permute,
    random_perms,
    repair,
)


def _cases():
    torch.manual_seed(0)
    img = torch.randn(16, 1, 8, 8)
    return {
        "mlp": (mlp((1, 8, 8), 5, width=12, depth=2), img),
        "cnn_batchnorm": (cnn((1, 8, 8), 5, channels=(4, 6)), img),
        "cnn_groupnorm": (cnn((1, 8, 8), 5, channels=(4, 6), norm="group"), img),
        "vit": (vit((1, 8, 8), 5, dim=16, depth=2, heads=4, patch=4), img),
        "moe_mlp": (moe_mlp((1, 8, 8), 5, width=8, depth=2, hidden=6, num_experts=4), img),
        "lm": (transformer_lm((8,), 11, dim=8, depth=2, heads=2, mlp_ratio=2), torch.randint(0, 11, (4, 8))),
        "moe_lm": (moe_lm((8,), 11, dim=8, depth=1, heads=2, hidden=6, num_experts=4), torch.randint(0, 11, (4, 8))),
        "sparse_mlp": (sparse_mlp((1, 8, 8), 5, width=8, depth=2, groups=4, density=0.5), img),
    }


CASES = _cases()


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", list(CASES))
def test_planted_permutation_keeps_the_function_and_is_recovered_exactly(name):
    model, x = CASES[name]
    model.eval()
    spec = permutation_spec(model)
    planted = random_perms(spec, torch.Generator().manual_seed(1))
    other = permute(model, planted, spec).eval()
    assert not _same(model, other)  # something really moved
    with torch.no_grad():
        y, y2 = model(x), other(x)
    assert float((y - y2).abs().max() / y.abs().max()) <= 1e-5
    want = invert(spec, planted)
    for method in ("weight", "activation"):
        aligned, perms = align(model, other, method=method, batches=[x])
        assert _same(model, aligned), method
        for n in spec.free():
            assert torch.equal(flat_perm(spec, perms, n), flat_perm(spec, want, n)), (method, n)
    assert _same(model, CASES[name][0])  # the inputs were not modified


def test_spec_covers_the_structure():
    spec = permutation_spec(CASES["vit"][0])
    heads = [n for n, p in spec.perms.items() if n.endswith("attn.heads")]
    assert len(heads) == 2 and all(spec.perms[n].size == 4 for n in heads)
    assert {p.parent for n, p in spec.perms.items() if n.endswith((".qk", ".vo"))} == set(heads)
    streams = [n for n, p in spec.perms.items() if p.size == 16 and p.parent is None]
    assert len(streams) == 1  # the residual stream: one permutation for stem, every block and head
    stream_axes = {a.tensor for a in spec.axes if a.perm == streams[0]}
    assert {"stem.pos", "body.layers.1.norm2.weight", "head.proj.weight"} <= stream_axes
    bn = permutation_spec(CASES["cnn_batchnorm"][0])
    moved = {a.tensor for a in bn.axes}
    assert {"body.layers.0.norm.running_mean", "body.layers.0.norm.running_var"} <= moved
    moe = permutation_spec(CASES["moe_mlp"][0])
    experts = [n for n in moe.perms if n.endswith("ffn.experts")]
    assert len(experts) == 2
    assert {a.tensor for a in moe.axes if a.perm == experts[0]} >= {"body.layers.0.ffn.router.proj.weight"}
    # the model's input features and classes are fixed
    assert not [a for a in permutation_spec(CASES["mlp"][0]).axes if a.tensor == "stem.proj.weight" and a.dim == 1]


def test_heads_move_as_whole_heads_between_independent_models():
    torch.manual_seed(3)
    a, b = (vit((1, 8, 8), 5, dim=16, depth=1, heads=4, patch=4) for _ in range(2))
    spec = permutation_spec(a)
    _, perms = align(a, b, method="weight")
    for n, p in spec.perms.items():
        if p.parent is not None and n.endswith((".qk", ".vo")):
            flat = flat_perm(spec, perms, n).view(4, p.size)
            head_of = flat // p.size
            assert (head_of == head_of[:, :1]).all()  # each new head takes all its neurons from one old head
            assert torch.equal(head_of[:, 0].sort().values, torch.arange(4))


def test_user_spec_for_a_plain_module():
    torch.manual_seed(0)

    class Net(nn.Module):  # no declared symmetry: fixed unless a spec is given
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(5, 7), nn.Linear(7, 3)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    model = Net()
    assert permutation_spec(model).perms == {}
    spec = PermutationSpec({"h": Perm(7)}, (Axis("a.weight", 0, "h"), Axis("a.bias", 0, "h"), Axis("b.weight", 1, "h")))
    planted = random_perms(spec, torch.Generator().manual_seed(2))
    other = permute(model, planted, spec)
    x = torch.randn(4, 5)
    assert torch.allclose(model(x), other(x), rtol=1e-5, atol=1e-6)
    aligned, perms = align(model, other, spec=spec)
    assert _same(model, aligned) and torch.equal(perms["h"], torch.argsort(planted["h"]))
    seq = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))  # torch layers: derived automatically
    assert [p.size for p in permutation_spec(seq).perms.values()] == [7]


def test_bad_input_gets_one_clear_message():
    a = mlp((1, 4, 4), 5, width=8, depth=2)
    with pytest.raises(BrickworkError, match="expected equal shapes and dtypes"):
        align(a, mlp((1, 4, 4), 5, width=10, depth=2))
    with pytest.raises(BrickworkError, match="different tensors"):
        align(a, mlp((1, 4, 4), 5, width=8, depth=3))
    with pytest.raises(BrickworkError, match="needs batches"):
        align(a, a, method="activation")
    bad = PermutationSpec({"h": Perm(9)}, (Axis("stem.proj.weight", 0, "h"),))
    with pytest.raises(BrickworkError, match="no 9 units"):
        align(a, a, spec=bad)


def test_interpolate_ends_and_repair_restores_endpoint_statistics():
    torch.manual_seed(0)
    a, b = mlp((1, 4, 4), 5, width=16, depth=2), mlp((1, 4, 4), 5, width=16, depth=2)
    x = torch.randn(64, 1, 4, 4)
    assert _same(interpolate(a, b, 0.0), a) and _same(interpolate(a, b, 1.0), b)
    mid = interpolate(a, b, 0.5)
    fixed = repair(mid, a, b, [x])
    from brickwork.ops.align import _unit_stats

    for path in ("stem.proj", "body.layers.0.linear", "body.layers.1.linear"):
        mu_a, s_a = _unit_stats(a, path, [x])
        mu_b, s_b = _unit_stats(b, path, [x])
        mu, s = _unit_stats(fixed, path, [x])
        assert torch.allclose(mu, (mu_a + mu_b) / 2, atol=1e-5) and torch.allclose(s, (s_a + s_b) / 2, atol=1e-5)
    assert _same(mid, interpolate(a, b, 0.5))  # repair copies
    # REPAIR of a model with itself changes nothing but round-off
    same = repair(a, a, a, [x])
    assert torch.allclose(same(x), a(x), atol=1e-5)


def _plain_descent(a: nn.Module, b: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Git re-basin's coordinate descent as written: every similarity recomputed at every step."""
    import numpy as np

    from brickwork.ops.align import _families, _objective, _Similarities, _solve
    from brickwork.ops.permutation import identity

    spec = permutation_spec(a)
    sa, sb = a.state_dict(), b.state_dict()
    perms = identity(spec)
    fams = {r: [r, *kids] for r, kids in _families(spec).items()}
    rng, names = np.random.default_rng(seed), sorted(fams)
    for _ in range(100):
        changed = False
        for r in [names[i] for i in rng.permutation(len(names))]:
            root, kids = _Similarities(spec, sa, sb).family(perms, fams[r])  # a fresh cache: nothing reused
            parent, nested, new = _solve(root, kids, spec.perms[r].size, spec.perms[r].fixed)
            old = _objective(root, kids, perms, fams[r])
            if new > old + 1e-12 * max(1.0, abs(old)):
                perms[r] = torch.from_numpy(parent).long()
                perms |= {c: torch.from_numpy(nested[c]).long() for c in fams[r][1:]}
                changed = True
        if not changed:
            break
    return perms


@pytest.mark.parametrize("name", ["mlp", "cnn_batchnorm", "vit", "moe_mlp", "sparse_mlp"])
def test_cached_weight_matching_finds_the_plain_descents_permutations(name):
    """Reused similarity terms and skipped unchanged steps change nothing: independent models
    (many moves over several passes) get exactly the permutations of the descent without them."""
    from brickwork.ops import weight_matching

    model = CASES[name][0]
    torch.manual_seed(7)
    other = copy.deepcopy(model)
    for p in other.parameters():
        p.data.normal_(0, 1)
    got, want = weight_matching(model, other), _plain_descent(model, other)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert any(not torch.equal(v, torch.arange(v.shape[-1]).expand_as(v)) for v in got.values())


@pytest.mark.parametrize("name", ["moe_mlp", "moe_lm", "sparse_mlp", "vit"])
def test_each_family_step_maximises_the_true_weight_inner_product(name):
    """The score one family's assignment maximises is sum_t <A_t, B_t permuted> over the tensors
    it moves, up to a constant: an expert's weights carry the expert axis and, batched by it, the
    expert's hidden units, and counting them again under the expert axis (units unaligned) biased
    the expert order to the identity (it stayed the identity in every trained MoE pair)."""
    from brickwork.ops.align import _families, _objective, _Similarities, _solve
    from brickwork.ops.permutation import axes_by_tensor, identity, permute_tensor

    torch.manual_seed(1)
    model = CASES[name][0]
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    for p in list(a.parameters()) + list(b.parameters()):
        torch.nn.init.normal_(p.data)  # independent random weights (A and B)
    spec = permutation_spec(a)
    sa, sb = a.state_dict(), b.state_dict()
    by_tensor = axes_by_tensor(spec)
    start = identity(spec)
    nested = {r: kids for r, kids in _families(spec).items() if kids}
    assert nested, "a case with nested permutations"
    for root, kids in nested.items():
        fam = [root, *kids]
        sims = _Similarities(spec, sa, sb)
        r, k = sims.family(start, fam)
        parent, inner, total = _solve(r, k, spec.perms[root].size, spec.perms[root].fixed)
        found = start | {root: torch.from_numpy(parent).long()} | {c: torch.from_numpy(inner[c]).long() for c in kids}
        moved = [t for t, axes in by_tensor.items() if any(ax.perm in fam and not ax.values for ax in axes)]

        def true(perms, moved=moved):
            return sum(
                float((sa[t].double() * permute_tensor(spec, perms, sb[t], by_tensor[t]).double()).sum()) for t in moved
            )

        gain = total - _objective(r, k, start, fam)
        assert true(found) - true(start) == pytest.approx(gain, rel=1e-9, abs=1e-9), root
