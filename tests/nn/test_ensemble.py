"""The ensemble brick: exact averages, shared-stem equivalence, compute that adds the members' costs."""

import pytest
import torch

from brickwork.analysis.compute import count_params, measure_compute
from brickwork.errors import BrickworkError
from brickwork.models import mlp
from brickwork.nn.ensemble import Ensemble, check_output_space
from brickwork.ops.layerwise import specialists


def _members(seed: int, widths=(8, 12, 5), classes=10):
    torch.manual_seed(seed)
    return [
        mlp(in_shape=(1, 4, 4), num_classes=classes, width=w, depth=1 + i % 2).double() for i, w in enumerate(widths)
    ]


@pytest.mark.parametrize("seed", range(3))
def test_logit_and_probability_averages_are_exact(seed):
    members = _members(seed)
    x = torch.randn(7, 1, 4, 4, dtype=torch.float64)
    outs = [m(x) for m in members]
    w = torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64)
    w = w / w.sum()
    got = Ensemble(members, weights=[1.0, 2.0, 5.0])(x)
    assert torch.allclose(got, sum(wi * o for wi, o in zip(w, outs, strict=True)), rtol=0, atol=1e-12)
    probs = Ensemble(members, combine="probs", weights=[1.0, 2.0, 5.0])(x).exp()
    want = sum(wi * o.softmax(-1) for wi, o in zip(w, outs, strict=True))
    assert torch.allclose(probs, want, rtol=0, atol=1e-12)
    assert torch.allclose(probs.sum(-1), torch.ones(7, dtype=torch.float64), atol=1e-12)


def test_a_shared_stem_runs_once_and_changes_nothing_but_the_cost():
    torch.manual_seed(0)
    base = mlp(in_shape=(1, 4, 4), num_classes=10, width=8, depth=2).double()
    shared = specialists(base, 3, share_stem=True, seed=5)
    apart = Ensemble(list(shared.members))  # the same members, each running the stem itself
    x = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    assert torch.allclose(shared(x), apart(x), rtol=0, atol=1e-12)
    # Hand counts (2 FLOPs per multiply-accumulate): stem 16->8, body 2 x 8->8, head 8->10.
    stem, body_head = 2 * 16 * 8, 2 * (2 * 8 * 8 + 8 * 10)
    assert measure_compute(apart, [x]).flops_per_sample == 3 * (stem + body_head)
    assert measure_compute(shared, [x]).flops_per_sample == stem + 3 * body_head
    # The shared stem's parameters are counted once.
    stem_params = 16 * 8 + 8
    assert count_params(shared) == stem_params + 3 * (count_params(base) - stem_params)


def test_ensemble_flops_are_the_sum_of_its_members():
    members = _members(1)
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    # widths 8 (depth 1), 12 (depth 2), 5 (depth 1), input 16, 10 classes
    hand = [2 * (16 * w + d * w * w + w * 10) for w, d in ((8, 1), (12, 2), (5, 1))]
    assert [measure_compute(m, [x]).flops_per_sample for m in members] == hand
    assert measure_compute(Ensemble(members), [x]).flops_per_sample == sum(hand)


def test_members_with_different_output_spaces_are_refused_in_one_line():
    a, b = _members(2, widths=(8,))[0], _members(3, widths=(8,), classes=7)[0]
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    with pytest.raises(BrickworkError, match=r"member 1 outputs shape \(2, 7\) but member 0 outputs \(2, 10\)") as e:
        check_output_space([a, b], x)
    assert "\n" not in str(e.value)
    assert check_output_space([a, a], x) == 10
    with pytest.raises(BrickworkError, match="share_stem"):
        Ensemble([a, b], share_stem=True)  # two different stems
    with pytest.raises(BrickworkError, match="weights"):
        Ensemble([a, a], weights=[1.0])
