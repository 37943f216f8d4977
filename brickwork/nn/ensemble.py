"""Composition of specialists: one model that averages the outputs of models sharing an output space.

Growing Transformers (Bochkov, 2025, arXiv 2507.07129) composes specialists trained on
different data, all reading the same frozen input embeddings, into one model "with zero
architectural modification" by **averaging their output logits**. :class:`Ensemble` does that
(``combine="logits"``), or averages probabilities (``combine="probs"``, the classic ensemble;
its output is then the log of the mean probability, so argmax and cross-entropy read it as they
read logits).

Members whose stems are one shared module (the frozen substrate of Growing Transformers) can
run that stem once (``share_stem=True``): the output is the same, and the compute accounting
(``analysis.compute``, which counts what executes) then counts the stem once. Without it every
member runs in full and the ensemble's FLOPs are the sum of its members' FLOPs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from brickwork.errors import BrickworkError
from brickwork.nn.modes import evaluating
from brickwork.nn.stack import StackModel

#: How member outputs are averaged: the logits themselves, or the softmax probabilities.
Combine = Literal["logits", "probs"]


class Ensemble(nn.Module):
    """The (weighted) mean of the members' outputs: ``sum_i w_i f_i(x)`` with ``sum_i w_i = 1``.

    Args:
        members: models mapping the same input to outputs of one shape, (B, K) or (B, T, K).
        combine: ``logits`` averages logits (Growing Transformers); ``probs`` averages softmax
            probabilities over the last dim and returns their log.
        weights: one non-negative weight per member (normalised to sum to 1); default equal.
        share_stem: the members are :class:`StackModel` s holding one and the same ``stem``
            module, which then runs once per forward pass.

    Raises:
        BrickworkError: no members, weights of the wrong length or sign, or ``share_stem`` with
            members that do not share one stem.

    Shapes:
        (B, ...) -> (B, K) or (B, T, K), as each member.
    """

    def __init__(
        self,
        members: Sequence[nn.Module],
        combine: Combine = "logits",
        weights: Sequence[float] | None = None,
        share_stem: bool = False,
    ) -> None:
        super().__init__()
        if not members:
            raise BrickworkError("Ensemble: needs at least one member")
        if combine not in ("logits", "probs"):
            raise BrickworkError(f"Ensemble: combine must be 'logits' or 'probs', got {combine!r}")
        w = [1.0] * len(members) if weights is None else [float(v) for v in weights]
        if len(w) != len(members) or any(v < 0 for v in w) or sum(w) <= 0:
            raise BrickworkError(
                f"Ensemble: weights must be {len(members)} non-negative numbers with a positive sum, got {w}"
            )
        if share_stem:
            stems = [getattr(m, "stem", None) for m in members]
            if not all(isinstance(m, StackModel) for m in members) or any(s is not stems[0] for s in stems):
                raise BrickworkError(
                    "Ensemble: share_stem needs StackModel members holding one and the same stem module"
                )
        self.members = nn.ModuleList(members)
        self.combine: Combine = combine
        self.share_stem = share_stem
        self.weights: Tensor
        self.register_buffer("weights", torch.tensor([v / sum(w) for v in w]), persistent=False)

    def __len__(self) -> int:
        return len(self.members)

    def member_outputs(self, x: Tensor) -> list[Tensor]:
        """Each member's output on ``x``, checked to share one output space.

        Raises:
            BrickworkError: two members' outputs differ in shape (different output spaces).
        """
        if self.share_stem:
            h = self.members[0].stem(x)  # type: ignore[operator]
            outs = [m.head(m.body(h)) for m in self.members]  # type: ignore[operator]
        else:
            outs = [m(x) for m in self.members]
        for i, o in enumerate(outs[1:], 1):
            if o.shape != outs[0].shape:
                raise BrickworkError(
                    f"Ensemble: member {i} outputs shape {tuple(o.shape)} but member 0 outputs "
                    f"{tuple(outs[0].shape)}; members must share one output space (same classes or vocabulary)"
                )
        return outs

    def forward(self, x: Tensor) -> Tensor:
        outs = self.member_outputs(x)
        w = self.weights.to(outs[0].dtype)
        if self.combine == "logits":
            # elementwise (no matmul), so the average itself costs no FLOPs under the accounting's convention
            mean = w[0] * outs[0]
            for wi, o in zip(w[1:], outs[1:], strict=True):
                mean = mean + wi * o
            return mean
        # log sum_i w_i softmax(o_i), computed stably in log space
        logp = torch.stack([torch.log_softmax(o, dim=-1) for o in outs])
        return torch.logsumexp(logp + w.log().view(-1, *([1] * (logp.dim() - 1))), dim=0)


def check_output_space(members: Sequence[nn.Module], x: Tensor) -> int:
    """The output size K the members share, found by running each on the probe batch ``x``.

    Call it before composing models from different sources, so a mismatch is reported before
    any work.

    Raises:
        BrickworkError: the members' outputs on ``x`` differ in shape.
    """
    with evaluating(*members), torch.no_grad():
        return int(Ensemble(list(members)).member_outputs(x)[0].shape[-1])
