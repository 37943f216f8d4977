"""Statistics some merges weigh by, estimated on data: the diagonal Fisher (Fisher merging,
Matena & Raffel, 2022) and the Gram matrices of linear layers' inputs (RegMean, Jin et al., 2023).

Both run the model in eval mode and leave it as it was; :func:`brickwork.ops.merge.merge` calls
them when a merge is given ``data=`` instead of precomputed ``statistics``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brickwork.errors import BrickworkError
from brickwork.nn.modes import evaluating

FisherTarget = Literal["predicted", "labels"]
F64 = torch.float64


def _inputs(batch: Tensor | tuple[Tensor, Tensor] | list[Tensor]) -> tuple[Tensor, Tensor | None]:
    if isinstance(batch, Tensor):
        return batch, None
    return batch[0], batch[1]


def fisher_diagonal(
    model: nn.Module, batches: Iterable[Tensor | tuple[Tensor, Tensor]], target: FisherTarget = "predicted"
) -> dict[str, Tensor]:
    """Diagonal Fisher of every trainable parameter: the mean over examples of squared gradients.

    The log-likelihood is that of the model's own arg-max prediction (``predicted``, default:
    no labels needed) or of the given labels (``labels``: the empirical Fisher), one example at
    a time (per-example gradients; cost: one backward per example). Logits (B, C) or (B, T, C)
    (summed over T). Runs in eval mode; the model's gradients are left untouched.

    Returns:
        Parameter name -> tensor of its shape.
    """
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    fisher = {k: torch.zeros_like(p, dtype=F64) for k, p in params.items()}
    count = 0
    with evaluating(model):
        for batch in batches:
            x, y = _inputs(batch)
            if target == "labels" and y is None:
                raise BrickworkError("fisher_diagonal: target='labels' needs (x, y) batches")
            for j in range(len(x)):
                logp = F.log_softmax(model(x[j : j + 1]).double(), dim=-1)
                label = logp.argmax(-1) if target == "predicted" else y[j : j + 1].view(logp.shape[:-1])  # type: ignore[index]
                ll = logp.gather(-1, label.unsqueeze(-1)).sum()
                grads = torch.autograd.grad(ll, list(params.values()), allow_unused=True)
                for (k, _), g in zip(params.items(), grads, strict=True):
                    if g is not None:
                        fisher[k] += g.to(F64) ** 2
                count += 1
    if count == 0:
        raise BrickworkError("fisher_diagonal: no examples in the batches")
    return {k: (f / count).to(params[k].dtype) for k, f in fisher.items()}


@torch.no_grad()
def gram_matrices(
    model: nn.Module, batches: Iterable[Tensor | tuple[Tensor, Tensor]], include: Sequence[str] | None = None
) -> dict[str, Tensor]:
    """Gram matrices X^T X (in, in), float64, of the inputs of every ``nn.Linear`` (RegMean's statistics).

    Args:
        model: run in eval mode on ``batches``.
        batches: inputs (B, ...) or (x, y) pairs; a linear's input (..., in) counts every row.
        include: module-path globs of the linears (default: all).

    Returns:
        ``path.weight`` -> (in, in), sums (not means) over all rows seen.
    """
    grams: dict[str, Tensor] = {}
    hooks = []
    for path, m in model.named_modules():
        if not isinstance(m, nn.Linear) or (
            include is not None and not any(fnmatch.fnmatchcase(path, p) for p in include)
        ):
            continue

        def hook(
            mod: nn.Module, inp: tuple[Tensor, ...], out: Tensor, key: str = f"{path}.weight" if path else "weight"
        ) -> None:
            x = inp[0].reshape(-1, inp[0].shape[-1]).to(F64)
            grams[key] = grams[key] + x.T @ x if key in grams else x.T @ x

        hooks.append(m.register_forward_hook(hook))
    try:
        with evaluating(model):
            for batch in batches:
                model(_inputs(batch)[0])
    finally:
        for h in hooks:
            h.remove()
    return grams
