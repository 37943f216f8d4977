"""Calibration of predicted probabilities: expected calibration error and reliability bins.

Guo et al. (2017), "On Calibration of Modern Neural Networks": predictions are grouped into
equal-width bins of confidence (the max softmax probability); ECE is the sample-weighted mean
over bins of |accuracy - mean confidence|. Early exits are where this matters most: a
threshold on confidence is only as good as the confidence is calibrated (JEI-DNN, Regol et
al., 2024, report that thresholded exits are over-confident).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class Reliability:
    """Per-bin calibration of a set of predictions.

    Attributes:
        edges: (bins + 1,) confidence bin edges on [0, 1].
        confidence: (bins,) mean confidence of the predictions in each bin (0 where empty).
        accuracy: (bins,) accuracy in each bin (0 where empty).
        count: (bins,) predictions per bin.
        ece: expected calibration error.
    """

    edges: Tensor
    confidence: Tensor
    accuracy: Tensor
    count: Tensor
    ece: float


def reliability(logits: Tensor, targets: Tensor, bins: int = 15) -> Reliability:
    """Bin predictions by confidence and compare with their accuracy.

    Args:
        logits: (N, K) or (B, T, K) unnormalised scores; every position is a prediction.
        targets: (N,) or (B, T) class ids.
        bins: equal-width confidence bins on [0, 1].
    """
    probs = logits.detach().float().flatten(0, -2).softmax(-1)
    conf, pred = probs.max(-1)
    correct = (pred == targets.flatten().to(pred.device)).float()
    # Bin b holds confidences in (edges[b], edges[b+1]]; confidence is > 0 so none is lost.
    idx = (conf * bins).ceil().long().clamp(1, bins) - 1
    count = torch.bincount(idx, minlength=bins).float()
    conf_sum = torch.bincount(idx, weights=conf, minlength=bins)
    acc_sum = torch.bincount(idx, weights=correct, minlength=bins)
    safe = count.clamp_min(1)
    confidence, accuracy = conf_sum / safe, acc_sum / safe
    n = max(conf.numel(), 1)
    ece = float(((count / n) * (accuracy - confidence).abs()).sum())
    return Reliability(torch.linspace(0, 1, bins + 1), confidence, accuracy, count.long(), ece)


def expected_calibration_error(logits: Tensor, targets: Tensor, bins: int = 15) -> float:
    """ECE of ``logits`` against ``targets`` (see :func:`reliability`); 0 is perfectly calibrated."""
    return reliability(logits, targets, bins).ece


# -- conformal prediction sets at the chosen exit ---------------------------------------------------


@dataclass
class ExitConformal:
    """Split-conformal prediction sets calibrated per exit.

    Attributes:
        alpha: miscoverage level; sets cover the true class with probability >= 1 - alpha.
        qhat: (E,) per exit (index into the exits and then the final head) the score quantile;
            ``inf`` where too few calibration samples left there (the set is then every class).
        calibrated: (E,) calibration samples per exit.
    """

    alpha: float
    qhat: Tensor
    calibrated: Tensor

    def sets(self, probs: Tensor, where: Tensor) -> Tensor:
        """(N, K) bool prediction sets: the classes whose probability at the sample's exit is at
        least ``1 - qhat[exit]``, from (N, K) probabilities and (N,) exit indices."""
        return probs >= (1.0 - self.qhat[where]).unsqueeze(1).to(probs.dtype)


def conformal_quantile(scores: Tensor, alpha: float) -> float:
    """The split-conformal threshold: the ceil((n + 1)(1 - alpha))-th smallest of n scores
    (``inf`` when that exceeds n), so a new exchangeable score is <= it with probability >= 1 - alpha
    (Vovk et al., 2005; Angelopoulos and Bates, 2021, eq. 1)."""
    n = scores.numel()
    k = math.ceil((n + 1) * (1 - alpha))
    if k > n:
        return math.inf
    return float(scores.double().sort().values[k - 1])


def calibrate_exits(probs: Tensor, targets: Tensor, where: Tensor, num_exits: int, alpha: float) -> ExitConformal:
    """Calibrate split-conformal sets at the exit each sample leaves by.

    JEI-DNN (Regol et al., 2024) reports conformal intervals for its exits: calibrating on the
    samples that leave at each exit keeps coverage valid *conditionally on the exit* (the exit
    decision makes the samples of one exit exchangeable among themselves, not with the others).
    The score is ``1 - p_y`` at the sample's exit (LAC, Sadinle et al., 2019); the set of a new
    sample is every class with ``p >= 1 - qhat``, so a confident prediction gets a small set.
    (Which score function JEI-DNN's code uses was not checked here; this is the standard one.)

    Args:
        probs: (N, K) probabilities at each calibration sample's exit.
        targets: (N,) true classes.
        where: (N,) exit index of each sample (0 .. ``num_exits - 1``).
        num_exits: E, the exits and the final head.
        alpha: miscoverage level in (0, 1).
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"calibrate_exits: alpha must lie in (0, 1), got {alpha}")
    score = 1.0 - probs.gather(1, targets.view(-1, 1).long()).squeeze(1)
    qhat = torch.tensor([conformal_quantile(score[where == e], alpha) for e in range(num_exits)], dtype=probs.dtype)
    return ExitConformal(alpha, qhat, torch.bincount(where, minlength=num_exits))


def conformal_summary(sets: Tensor, targets: Tensor, where: Tensor, num_exits: int) -> dict[str, Any]:
    """Coverage and mean set size of (N, K) sets, overall and per exit (NaN where no sample left)."""
    covered = sets.gather(1, targets.view(-1, 1).long()).squeeze(1).double()
    size = sets.sum(1).double()

    def per_exit(v: Tensor) -> list[float]:
        return [float(v[where == e].mean()) if bool((where == e).any()) else math.nan for e in range(num_exits)]

    return {
        "coverage": float(covered.mean()),
        "set_size": float(size.mean()),
        "coverage_per_exit": per_exit(covered),
        "set_size_per_exit": per_exit(size),
    }


def conformal_at_exits(
    cal_outs: list[Tensor],
    cal_y: Tensor,
    cal_where: Tensor,
    test_outs: list[Tensor],
    test_y: Tensor,
    test_where: Tensor,
    alpha: float,
) -> tuple[ExitConformal, dict[str, Any]]:
    """Calibrate conformal sets at each sample's exit on one split and measure them on another.

    Args:
        cal_outs, test_outs: each exit's and then the final head's (N, K) logits
            (``analysis.exits.exit_outputs``).
        cal_y, test_y: (N,) classes.
        cal_where, test_where: (N,) the exit each sample leaves by (``analysis.exits.simulate``).
        alpha: miscoverage level.

    Returns:
        The calibration and :func:`conformal_summary` of the test sets.
    """

    def at_exit(outs: list[Tensor], where: Tensor) -> Tensor:
        probs = torch.stack([z.double().softmax(-1) for z in outs])  # (E, N, K)
        return probs.gather(0, where.view(1, -1, 1).expand(1, *probs.shape[1:]))[0]

    num_exits = len(cal_outs)
    conf = calibrate_exits(at_exit(cal_outs, cal_where), cal_y, cal_where, num_exits, alpha)
    sets = conf.sets(at_exit(test_outs, test_where), test_where)
    return conf, conformal_summary(sets, test_y, test_where, num_exits)
