"""Fine-tuning a sentence encoder with a linear head: one budget for dense and converted encoders."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from brickwork.data.base import Split
from brickwork.nn.heads import SentenceClassifier
from brickwork.train.loop import FitConfig, evaluate, fit
from brickwork.train.losses import build_loss


def finetune_classifier(
    encoder: nn.Module,
    dim: int,
    train: Split,
    test: Split,
    *,
    num_classes: int = 2,
    epochs: int = 1,
    batch_size: int = 16,
    lr: float = 3e-5,
    head_lr: float = 1e-3,
    warmup_steps: int = 20,
    seed: int = 0,
) -> dict[str, Any]:
    """Fine-tune a copy of ``encoder`` with a linear head (AdamW, cosine schedule); test accuracy.

    The encoder's own router (an MoEfied FFN's gate) is trained with it as far as it is
    differentiable; EMoE's avg-k gate follows the fine-tuned keys by construction. ``encoder``
    itself is left unchanged.

    Args:
        encoder: (B, T) int64 ids -> (B, dim) embeddings.
        dim: embedding size.
        train: (N, T) int64 ids padded with 0, (N,) labels.
        test: the same, for the reported accuracy.

    Returns:
        ``{"accuracy", "loss", "steps", "history"}`` on ``test``.
    """
    torch.manual_seed(seed)
    model = SentenceClassifier(copy.deepcopy(encoder), dim, num_classes)
    groups = [
        {"params": list(model.encoder.parameters()), "lr": lr},
        {"params": list(model.head.parameters()), "lr": head_lr},
    ]
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    cfg = FitConfig(epochs=epochs, batch_size=batch_size, seed=seed, schedule="cosine", warmup_steps=warmup_steps)
    loss_fn = build_loss("cross_entropy")
    history = fit(model, train, Split(train.x[:0], train.y[:0]), loss_fn, opt, cfg, progress=False)
    result = evaluate(model, test, loss_fn, batch_size=128)
    steps = epochs * -(-len(train) // batch_size)
    return {"accuracy": result["accuracy"], "loss": result["loss"], "steps": steps, "history": history}
