"""Monte Carlo tree search over skip/loop chains finds the best chain where it is known."""

from collections import Counter

import torch
from torch import nn

from brickwork.models import mlp
from brickwork.nn import Stack, StackModel
from brickwork.ops.chain import _neighbours, chain_correct, enumerate_chains, mcts_chain, mcts_search


def test_mcts_finds_the_known_best_chain_of_a_toy_problem() -> None:
    target = (0, 2, 2)  # three edits from the full chain (0, 1, 2, 3): skip 1, skip 3, loop 2

    def reward(c: tuple[int, ...]) -> float:
        # distance between layer-count vectors, so nearby chains score nearby; the target alone is best
        want, have = Counter(target), Counter(c)
        return -sum(abs(want[i] - have[i]) for i in range(4)) - 0.01 * len(c) + (1.0 if c == target else 0.0)

    space = enumerate_chains(4, max_repeat=2)
    assert max(space, key=reward) == target  # known optimum of the whole space
    best, scores = mcts_search((0, 1, 2, 3), lambda c: _neighbours(c, 4, 2, 6), reward, simulations=60, seed=0)
    assert best == target
    assert len(scores) <= 61 < len(space)  # within budget, without enumerating the space


def test_mcts_chain_on_a_model_returns_an_evaluated_chain_no_worse_than_the_full_one() -> None:
    torch.manual_seed(0)
    model = mlp((1, 8, 8), 5, width=8, depth=3)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 5, (32,))
    best, seen = mcts_chain(model, x, y, simulations=12, cost_weight=0.5)
    full = next(r for r in seen if r.chain == (0, 1, 2))
    assert best in seen
    assert best.accuracy - 0.5 * best.cost / 3 >= full.accuracy - 0.5 * full.cost / 3


class _Add(nn.Module):
    """h + v: a layer whose effect on the logits is known exactly."""

    def __init__(self, v: list[float]) -> None:
        super().__init__()
        self.register_buffer("v", torch.tensor(v, dtype=torch.float64))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.v


def test_mcts_in_a_budget_of_evaluations_finds_the_known_cheapest_chain_and_is_deterministic() -> None:
    """Logits = stem + the chain's layer vectors, the same for every sample, so a chain's accuracy is
    the share of the class it predicts: class 0 (40%) needs logit 0 above 0.1 + 0.05 n_1 + 0.2 n_3.
    Over the whole space the cheapest chain meeting 0.40 is (0, 0), four edits from the full chain
    (which predicts class 1, 0.35)."""
    from brickwork.ops.chain import beam_search_chain, mcts_cheapest_chain

    layers = [_Add([0.06, 0, 0.02]), _Add([0, 0.05, 0]), _Add([0.08, 0, 0]), _Add([0, 0.2, 0])]
    model = StackModel(_Add([0.0, 0.1, 0.0]), Stack(layers), nn.Identity())
    x, y = torch.zeros(100, 3, dtype=torch.float64), torch.tensor([0] * 40 + [1] * 35 + [2] * 25)
    costs = [1.0, 2.0, 3.0, 4.0]
    space = [(), *enumerate_chains(4, max_repeat=2)]
    acc = {c: float(chain_correct(model, c, x, y).mean()) for c in space}
    ok = [c for c in space if acc[c] >= 0.4]
    assert min(ok, key=lambda c: sum(costs[i] for i in c)) == (0, 0) and abs(acc[(0, 1, 2, 3)] - 0.35) < 1e-6
    _, beam_seen = beam_search_chain(model, x, y, min_accuracy=0.4, costs=costs, beam=4)
    budget = len(beam_seen)  # the same number of chain evaluations as beam search
    runs = [
        mcts_cheapest_chain(model, x, y, min_accuracy=0.4, evaluations=budget, costs=costs, seed=s) for s in (0, 0, 1)
    ]
    for best, seen in runs:
        assert best.chain == (0, 0) and abs(best.accuracy - 0.4) < 1e-6
        assert len(seen) <= budget < len(space)
    assert [r.chain for r in runs[0][1]] == [r.chain for r in runs[1][1]]  # same seed: the same search
