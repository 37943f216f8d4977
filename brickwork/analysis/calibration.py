"""Calibration of predicted probabilities: expected calibration error and reliability bins.

Guo et al. (2017), "On Calibration of Modern Neural Networks": predictions are grouped into
equal-width bins of confidence (the max softmax probability); ECE is the sample-weighted mean
over bins of |accuracy - mean confidence|. Early exits are where this matters most: a
threshold on confidence is only as good as the confidence is calibrated (JEI-DNN, Regol et
al., 2024, report that thresholded exits are over-confident).
"""

from __future__ import annotations

from dataclasses import dataclass

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
