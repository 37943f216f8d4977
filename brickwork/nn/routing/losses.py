"""Auxiliary router losses: Switch/GShard load balancing, the ST-MoE router z-loss, and Shazeer et al.'s
importance and load losses (``cv_squared`` of the importance and of the smooth load estimate).

All are returned unweighted; the training loop weights them by name from the config, defaulting
to the papers' weights (``nn.records.AUX_LOSS_DEFAULTS``: ``load_balance`` 1e-2 as in Switch
Transformer, ``z_loss`` 1e-3 as in ST-MoE, ``importance`` and ``load`` 0.1 as in Shazeer et al.).
"""

from __future__ import annotations

import torch
from torch import Tensor

from brickwork.nn.routing.types import router_precision


def load_balance_loss(probs: Tensor, expert_idx: Tensor, num_experts: int) -> Tensor:
    """Switch/GShard load-balancing loss ``E * sum_i f_i * P_i``.

    ``f_i`` is the fraction of *assignments* dispatched to expert ``i``, counted from the
    discrete routing decision over all k slots (``count_i / (tokens * k)``), so it carries no
    gradient; ``P_i`` is the mean router probability of expert ``i`` over tokens, which carries
    it. The factor ``E`` makes the loss 1 under perfectly uniform routing whatever E is
    (Fedus et al., 2021, eq. 4; Lepikhin et al., 2020). Pitfalls of popular implementations
    that this avoids: computing ``f`` from probabilities (it then pushes towards uniform
    probabilities, not uniform load), and dropping the factor ``E``.

    Args:
        probs: (N, E) router probabilities per token (rows sum to 1).
        expert_idx: (A,) or (N, k) experts chosen by the routing decision (before any
            capacity dropping, as in Switch).
        num_experts: E.

    Returns:
        Scalar loss, minimum 1 at uniform load and uniform mean probability.
    """
    counts = torch.bincount(expert_idx.reshape(-1), minlength=num_experts)
    f = counts.to(probs.dtype) / max(expert_idx.numel(), 1)
    p = probs.mean(dim=0)
    return num_experts * torch.sum(f * p)


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean over tokens of ``logsumexp(logits)^2`` (Zoph et al., 2022, eq. 5).

    Penalises large router logits, which cause round-off errors in the exponentials of the
    softmax and make training unstable.

    Args:
        logits: (N, E) router logits.
    """
    return torch.logsumexp(router_precision(logits), dim=-1).square().mean()


def cv_squared(values: Tensor, eps: float = 1e-10) -> Tensor:
    """Squared coefficient of variation ``Var(v) / (mean(v)^2 + eps)`` of a (E,) vector.

    Shazeer et al. (2017), eqs. 6-7 and 11: the importance and load losses are ``CV(.)^2``
    times their weights. The variance is the population variance (as ``tf.nn.moments`` in
    their tensor2tensor code); a single expert has no variation (0).
    """
    if values.numel() <= 1:
        return values.new_zeros(())
    v = values.to(torch.promote_types(values.dtype, torch.float32))
    return v.var(unbiased=False) / (v.mean().square() + eps)


def smooth_load(clean: Tensor, noisy: Tensor, noise_std: Tensor, k: int) -> Tensor:
    """Shazeer et al.'s smooth load estimator: ``P(x, i)``, the chance expert i is in the top k.

    Appendix A, eqs. 8-10: with the other experts' noisy logits held as sampled, expert i is in
    the top k when its own noisy logit beats ``kth_excluding(H(x), k, i)``, the k-th largest of
    the *other* experts' noisy logits; re-sampling i's noise only, that has probability
    ``Phi((clean_i - kth_excluding_i) / std_i)``, differentiable in the gate and noise weights.
    ``kth_excluding`` is the (k+1)-th largest overall value when i itself is in the top k, and
    the k-th largest otherwise. ``Load(X) = sum_x P(x, .)`` (eq. 10).

    Args:
        clean: (N, E) logits ``x W_g``.
        noisy: (N, E) ``H(x)``: clean logits plus their sampled noise.
        noise_std: (N, E) ``Softplus(x W_noise)`` (plus any floor).
        k: experts per token, ``k < E``.

    Returns:
        (N, E) probabilities.
    """
    top = torch.topk(noisy, k + 1, dim=-1).values  # (N, k + 1)
    in_top = noisy >= top[:, k - 1 : k]  # i among the k largest
    threshold = torch.where(in_top, top[:, k : k + 1], top[:, k - 1 : k])
    normal = torch.distributions.Normal(torch.zeros((), dtype=clean.dtype), torch.ones((), dtype=clean.dtype))
    return normal.cdf((clean - threshold) / noise_std)
