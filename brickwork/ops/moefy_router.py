"""Training MoEfication's MLP router: what it learns to predict, how, and how well it does.

The router itself (:class:`~brickwork.nn.routing.MLPRouter`, router ``mlp``) and EMoE's
training-free gate (:class:`~brickwork.nn.routing.KeyRouter`, router ``emoe``) are bricks in
``nn/routing``; this module is the conversion's part: the target each expert's router score
should predict (:func:`expert_activation_sums`, the sum of the positive activations of its
neurons), the recall of the top-k experts by that target, and the fit (binary cross-entropy on
targets scaled to [0, 1], as in MoEfication's released code; Zhang et al., 2022).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from brickwork.nn.routing import MLPRouter


def expert_activation_sums(
    x: Tensor, w_up: Tensor, b_up: Tensor | None, partition: Tensor, act: Callable[[Tensor], Tensor]
) -> Tensor:
    """(N, E) sum over each expert's neurons of the positive part of their activation.

    Args:
        x: (N, D) FFN inputs.
        w_up: (H, D) up-projection; b_up: (H,) or None.
        partition: (E, H/E) neuron indices per expert.
        act: the FFN activation.
    """
    h = act(F.linear(x, w_up, b_up)).clamp_min(0)  # (N, H)
    return h[:, partition].sum(-1)  # (N, E, H/E) -> (N, E)


def router_recall(scores: Tensor, target: Tensor, top_k: int) -> float:
    """Share of the ``top_k`` experts with the largest activation sums that the router's top-k finds."""
    pred = torch.topk(scores, top_k, dim=-1).indices
    true = torch.topk(target, top_k, dim=-1).indices
    hit = (pred.unsqueeze(-1) == true.unsqueeze(-2)).any(-1).float()
    return float(hit.mean())


def train_mlp_router(
    router: MLPRouter,
    x: Tensor,
    target: Tensor,
    *,
    epochs: int = 10,
    batch_size: int = 512,
    lr: float = 1e-2,
    seed: int = 0,
) -> dict[str, float]:
    """Fit ``router`` to predict expert activation sums, MoEfication style; returns held-out recall.

    The tokens are split 80/10/10 (seeded): Adam on binary cross-entropy against
    ``target / max(target)`` on the first part; after every epoch the top-k recall on the second
    part decides which epoch's weights are kept (MoEfication's code also keeps its best epoch;
    the key initialisation competes as epoch 0, so training never makes the router worse on
    it); the last part reports the recall of the kept router.

    Args:
        x: (N, D) FFN inputs on real text.
        target: (N, E) :func:`expert_activation_sums` of those inputs.
        epochs, batch_size, lr: the optimisation.
        seed: shuffling and the split.

    Returns:
        ``{"recall", "recall_keys", "epoch"}``: recall on the reporting part for the kept router
        and for its key initialisation, and the epoch kept (0 = the initialisation).
    """
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    n10 = max(1, len(x) // 10)
    report, select, train = perm[:n10], perm[n10 : 2 * n10], perm[2 * n10 :]
    y = target / target.max().clamp_min(1e-12)

    def recall(idx: Tensor) -> float:
        with torch.no_grad():
            return router_recall(router.scores(x[idx]), target[idx], router.top_k)

    keys_recall = recall(report)
    best, best_state, best_epoch = recall(select), copy.deepcopy(router.state_dict()), 0
    opt = torch.optim.Adam(router.parameters(), lr=lr)
    for epoch in range(1, epochs + 1):
        order = train[torch.randperm(len(train), generator=g)]
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            loss = F.binary_cross_entropy_with_logits(router.scores(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        score = recall(select)
        if score > best:
            best, best_state, best_epoch = score, copy.deepcopy(router.state_dict()), epoch
    router.load_state_dict(best_state)
    return {"recall": recall(report), "recall_keys": keys_recall, "epoch": float(best_epoch)}
