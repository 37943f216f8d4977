"""The offline exit simulation decides what the brick's compacting forward decides: the same exit
for every sample and the same accuracy, for each policy and threshold; and the operating point."""

import pytest
import torch

from brickwork.analysis.exits import exit_outputs, exit_scores, exit_shares, per_exit, select, simulate
from brickwork.data.base import Split
from brickwork.models import mlp
from brickwork.nn import ClassifierHead
from brickwork.nn.exits import EarlyExit, ExitGate

W, K = 16, 5


def model(policy):
    torch.manual_seed(0)
    heads = {i: ClassifierHead(W, K) for i in (0, 2)}
    gates = {i: ExitGate() for i in heads} if policy == "gate" else None
    return EarlyExit(mlp((1, 8, 8), K, width=W, depth=4), heads, gates=gates, policy=policy).eval()


@torch.no_grad()
def compacting_forward(m, x):
    """The brick's own outputs (N, K) and exit layers (N,), batch by batch."""
    outs, left = [], []
    for xb in x.split(32):
        outs.append(m(xb))
        left.append(m.record.layer)
    return torch.cat(outs), torch.cat(left)


@pytest.mark.parametrize("policy", ["confidence", "entropy", "gate"])
def test_simulation_takes_the_exits_and_gets_the_accuracy_of_the_compacting_forward(policy):
    m = model(policy)
    torch.manual_seed(1)
    split = Split(torch.randn(96, 1, 8, 8) * 3, torch.randint(0, K, (96,)))
    outs = exit_outputs(m, split, 32, "cpu")
    scores = exit_scores(m, outs)
    layers = torch.tensor([*m.exit_layers, len(m.body) - 1])
    quantiles = [float(scores[0].quantile(q)) for q in (0.2, 0.5, 0.8)]
    for t in [1.0, *quantiles, float(scores[1].median()), 0.0]:
        m.threshold.fill_(t)
        where, hit = simulate(scores, outs, split.y, t)
        real, left = compacting_forward(m, split.x)
        assert torch.equal(layers[where], left)
        assert float(hit.mean()) == float((real.argmax(-1) == split.y).float().mean())
        shares = exit_shares(m, split, 32, "cpu")
        assert shares == {int(v): float((layers[where] == v).float().mean()) for v in layers[where].unique()}
        if t == quantiles[1]:
            assert 0 < int((where == 0).sum()) < len(split)  # about half leave at the first exit
    assert int((where == 0).sum()) == len(split)  # threshold 0: everyone leaves at the first exit


def test_per_exit_accuracy_and_layers():
    m = model("confidence")
    split = Split(torch.randn(20, 1, 8, 8), torch.randint(0, K, (20,)))
    outs = exit_outputs(m, split, 8, "cpu")
    rows = per_exit(outs, split.y, [0, 2, 3], 10)
    assert [r["exit"] for r in rows] == ["exit 0", "exit 2", "final"]
    with torch.no_grad():
        final = m.head(m.body(m.stem(split.x)))
    assert rows[-1]["accuracy"] == float((final.argmax(-1) == split.y).float().mean())


def test_operating_point_selection_by_accuracy_or_by_budget():
    sweep = [
        {"threshold": t, "val_accuracy": a, "val_flops": f}
        for t, a, f in [(1.0, 0.90, 100), (0.9, 0.899, 70), (0.8, 0.897, 55), (0.7, 0.894, 45), (0.6, 0.88, 30)]
    ]
    assert select(sweep, 0.005, None)["threshold"] == 0.8  # fewest FLOPs within 0.5 points
    assert select(sweep, 0.005, 0.4)["threshold"] == 0.8  # most accurate saving >= 40%
    assert select(sweep, 0.005, 0.5)["threshold"] == 0.7
    assert select(sweep, 0.005, 0.9)["threshold"] == 0.8  # no threshold saves 90%: the accuracy rule
