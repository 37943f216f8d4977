"""Split-conformal sets at the chosen exit: coverage >= 1 - alpha on held-out data, small when confident."""

import math

import torch

from brickwork.analysis.calibration import calibrate_exits, conformal_quantile, conformal_summary


def synthetic(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, 5) probabilities, labels drawn from them (so they are calibrated), and 2 exits: exit 0
    takes the confident samples (sharp logits), exit 1 the rest, as a confidence threshold would."""
    sharp = torch.rand(n, 1, generator=gen) < 0.5
    logits = torch.randn(n, 5, generator=gen) * torch.where(sharp, 4.0, 0.7)
    probs = logits.softmax(1).double()
    y = torch.multinomial(probs, 1, generator=gen).squeeze(1)
    where = (~sharp.squeeze(1)).long()
    return probs, y, where


def test_quantile_is_the_finite_sample_corrected_order_statistic():
    s = torch.arange(1.0, 11.0)  # 10 scores
    assert conformal_quantile(s, 0.1) == 10.0  # ceil(11 * 0.9) = 10th
    assert conformal_quantile(s, 0.5) == 6.0  # ceil(5.5) = 6th
    assert conformal_quantile(s, 0.05) == math.inf  # ceil(10.45) = 11 > 10: every class


def test_coverage_holds_on_held_out_data_over_random_splits_and_per_exit():
    alpha, gen = 0.1, torch.Generator().manual_seed(0)
    probs, y, where = synthetic(4000, gen)
    coverage, per_exit = [], []
    for _ in range(20):
        perm = torch.randperm(len(y), generator=gen)
        cal, test = perm[:2000], perm[2000:]
        conf = calibrate_exits(probs[cal], y[cal], where[cal], 2, alpha)
        summary = conformal_summary(conf.sets(probs[test], where[test]), y[test], where[test], 2)
        coverage.append(summary["coverage"])
        per_exit.append(summary["coverage_per_exit"])
    # Over random splits the mean coverage is >= 1 - alpha (exactly, in expectation); each split
    # within sampling noise (2,000 test samples: std ~ 0.007).
    assert sum(coverage) / len(coverage) >= 1 - alpha - 0.005
    assert min(coverage) >= 1 - alpha - 0.025
    for e in range(2):
        assert sum(p[e] for p in per_exit) / len(per_exit) >= 1 - alpha - 0.01  # conditional on the exit


def test_sets_shrink_as_confidence_grows():
    gen = torch.Generator().manual_seed(1)
    probs, y, where = synthetic(3000, gen)
    conf = calibrate_exits(probs, y, where, 2, 0.1)
    sets = conf.sets(probs, torch.ones_like(where))  # one threshold (exit 1's) for all: like with like
    size, top = sets.sum(1).double(), probs.max(1).values
    order = top.argsort()
    quarters = [size[order[i * 750 : (i + 1) * 750]].mean() for i in range(4)]
    # LAC's set {p >= tau} has at most 1 + (1 - p_max) / tau classes: the bound falls as p_max
    # grows (a set may even be empty when p_max < tau, as LAC allows)
    bound = 1 + (1 - top) / (1 - conf.qhat[1])
    assert (size <= bound + 1e-9).all()
    assert all(a > b for a, b in zip(quarters, quarters[1:], strict=False))
    summary = conformal_summary(conf.sets(probs, where), y, where, 2)
    assert summary["set_size_per_exit"][0] < summary["set_size_per_exit"][1]  # the confident exit: smaller
