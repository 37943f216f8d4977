"""Optimizers and learning-rate schedules by name."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import nn

from brickwork.registry import REGISTRY, register

Params = Iterable[nn.Parameter] | Iterable[dict]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]


@register("optimizer", "adamw")
def adamw(params: Params, /, lr: PositiveFloat = 1e-3, weight_decay: NonNegFloat = 0.01) -> torch.optim.Optimizer:
    """AdamW (Loshchilov & Hutter, 2019): Adam with decoupled weight decay."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


@register("optimizer", "adam")
def adam(params: Params, /, lr: PositiveFloat = 1e-3, weight_decay: NonNegFloat = 0.0) -> torch.optim.Optimizer:
    """Adam (Kingma & Ba, 2015), L2 penalty folded into the gradient."""
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


@register("optimizer", "sgd")
def sgd(
    params: Params,
    /,
    lr: PositiveFloat = 0.1,
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9,
    weight_decay: NonNegFloat = 0.0,
) -> torch.optim.Optimizer:
    """SGD with (heavy-ball) momentum."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def build_optimizer(name: str, params: Params, **args: object) -> torch.optim.Optimizer:
    """The registered optimizer ``name`` over ``params``."""
    return REGISTRY.get("optimizer", name).obj(params, **args)


Schedule = Literal["constant", "cosine"]


def lr_factor(schedule: Schedule, step: int, total: int, warmup: int) -> float:
    """Multiplier of the base learning rate at ``step`` of ``total``: linear warm-up, then
    constant or cosine decay to zero (Loshchilov & Hutter, 2017, without restarts)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
