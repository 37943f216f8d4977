"""Monte Carlo tree search over skip/loop chains finds the best chain where it is known."""

from collections import Counter

import torch

from brickwork.models import mlp
from brickwork.ops.chain import _neighbours, enumerate_chains, mcts_chain, mcts_search


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
