"""Early exits on any stack model: exit heads by layer index, three training objectives, and
per-sample exiting that removes exited samples from the batch.

Training (:meth:`EarlyExit.training_loss`, called by the training loop):

* ``weighted``: a weighted sum of the exits' task losses and the final head's (the usual
  multi-exit objective, e.g. BranchyNet, Teerapittayanon et al., 2016).
* ``distill``: multi-exit self-distillation, deeper outputs teach earlier ones: each exit
  minimises ``(1 - a) CE + a T^2 KL(teacher || exit)`` with the final head (or the next deeper
  exit) as a detached teacher (Zhang et al., 2019, "Be Your Own Teacher"; the layer-wise
  self-distillation of ModularStarEncoder, Gurioli et al., 2025).
* ``jei``: exit gates learned jointly with the exit heads (JEI-DNN, Regol et al., 2024). Gate
  ``k`` reads features of exit ``k``'s prediction and gives ``g_k``; a sample exits at ``k``
  with probability ``q_k = g_k prod_{j<k} (1 - g_j)``. The heads minimise their task losses;
  the gates minimise the expected cost-aware loss ``sum_k q_k (CE_k + lambda c_k)`` with the
  heads' losses detached, the two levels of JEI-DNN's bi-level problem taken in one step.

Inference (eval mode): a sample leaves at the first exit whose score exceeds ``threshold``:
softmax confidence, ``1 - normalised entropy``, or the learned gate (:func:`choose_exit`, the one
exit rule: the brick's forward and any offline simulation of it call it). Exited samples are
removed from the batch (it is compacted), so later layers really run on fewer samples: the
dispatcher counts fewer FLOPs and wall-clock falls too. Every score is in [0, 1] and the test
is strict, so ``threshold = 1.0`` never exits: the model is then its full-depth self.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brickwork.nn.stack import StackModel
from brickwork.registry import register

ExitPolicy = Literal["confidence", "entropy", "gate"]
ExitObjective = Literal["weighted", "distill", "jei"]
Teacher = Literal["final", "next"]
LossFn = Callable[[Tensor, Tensor], Tensor]


def prediction_features(logits: Tensor) -> Tensor:
    """Per-sample features of a prediction: max probability, top-1 minus top-2 margin, and
    ``1 - entropy / log K``, each in [0, 1] and averaged over positions of (B, T, K) outputs.

    Shapes:
        (B, K) | (B, ..., K) -> (B, 3)
    """
    p = logits.float().softmax(-1)
    k = p.shape[-1]
    top = p.topk(min(2, k), dim=-1).values
    margin = top[..., 0] - top[..., 1] if k > 1 else top[..., 0]
    entropy = -(p * p.clamp_min(1e-12).log()).sum(-1) / math.log(k) if k > 1 else torch.zeros_like(margin)
    feats = torch.stack([top[..., 0], margin, 1.0 - entropy], dim=-1)
    return feats.reshape(feats.shape[0], -1, 3).mean(1)


def can_exit(threshold: float) -> bool:
    """Whether any sample can leave early at ``threshold``: scores are in [0, 1] and the test is
    strict, so at 1.0 nobody does and the exits need not even be run."""
    return threshold < 1.0


def choose_exit(scores: Sequence[Tensor], threshold: float) -> Tensor:
    """The exit rule: each sample takes the first exit whose score exceeds ``threshold``.

    The compacting forward calls it one exit at a time on the rows still in the batch (a row's
    choice depends only on its own scores, in depth order), an offline simulation once with
    every exit's scores: both decide the same.

    Args:
        scores: per exit in depth order, (B,) scores in [0, 1] (:meth:`EarlyExit.score`).
        threshold: in [0, 1]; compared in the scores' dtype.

    Returns:
        (B,) int64 index into ``scores`` of the exit taken; ``len(scores)`` where none is taken
        (the sample goes on, to the final head after the last exit).
    """
    if not scores:
        raise ValueError("choose_exit: no exit scores")
    where = torch.full(scores[0].shape, len(scores), dtype=torch.long, device=scores[0].device)
    if not can_exit(threshold):
        return where
    for k in range(len(scores) - 1, -1, -1):  # deepest first, so the first exit taken wins
        where[scores[k] > threshold] = k
    return where


@register("brick", "exit_gate")
class ExitGate(nn.Module):
    """A learned exit decision: ``sigmoid(w . features(logits) + b)`` per sample (JEI-DNN's gate).

    The gate reads only the exit's prediction (:func:`prediction_features`), as JEI-DNN's
    gates read the inference modules' outputs, so it is tiny and architecture-agnostic.

    Shapes:
        (B, K) | (B, T, K) logits -> (B,) exit probability
    """

    def __init__(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 1, device=device, dtype=dtype)

    def forward(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(self.proj(prediction_features(logits).to(self.proj.weight.dtype))).squeeze(-1)


@dataclass
class ExitRecord:
    """Where each sample of the latest eval-mode forward left.

    Attributes:
        layer: (B,) body layer index after which each sample exited; ``num_layers - 1`` is
            the final head.
        num_layers: body depth L.
    """

    layer: Tensor
    num_layers: int

    def fractions(self) -> dict[int, float]:
        """Share of samples leaving after each layer that someone left at."""
        values, counts = self.layer.unique(return_counts=True)
        n = self.layer.numel()
        return {int(v): int(c) / n for v, c in zip(values, counts, strict=True)}


class EarlyExit(StackModel):
    """A stack model with exit heads after some body layers (same stem, body and head).

    Args:
        model: the stack model; its ``head`` stays the final exit.
        exits: exit heads by body layer index (negative counts from the end; the last layer
            is the final head's). Each maps that layer's hidden state to the head's output shape.
        gates: a gate per exit (:class:`ExitGate`), required by ``policy="gate"`` and
            ``objective="jei"``.
        policy: the exit score compared with ``threshold`` at inference.
        threshold: initial threshold in [0, 1] (a buffer: an operating point chosen later is
            saved with the weights).
        objective: the training objective (see the module docstring).
        weights: loss weight of each exit and then the final head (default all 1).
        temperature, distill_weight, teacher: self-distillation's T, a, and teacher.
        costs: relative cost of leaving at each exit and at the end (default (i+1)/L; the
            builder passes measured FLOPs fractions), the ``c_k`` of the JEI-DNN gate loss.
        cost_weight: the JEI-DNN ``lambda``, in task-loss units per full-model cost.

    Shapes:
        as the wrapped model, e.g. (B, C, H, W) -> (B, K) or (B, T) -> (B, T, V).
    """

    threshold: Tensor  # () buffer
    costs: Tensor  # (exits + 1,) buffer

    def __init__(
        self,
        model: StackModel,
        exits: Mapping[int, nn.Module],
        *,
        gates: Mapping[int, nn.Module] | None = None,
        policy: ExitPolicy = "confidence",
        threshold: float = 0.9,
        objective: ExitObjective = "weighted",
        weights: Sequence[float] | None = None,
        temperature: float = 3.0,
        distill_weight: float = 0.5,
        teacher: Teacher = "final",
        costs: Sequence[float] | None = None,
        cost_weight: float = 0.1,
    ) -> None:
        super().__init__(model.stem, model.body, model.head)
        n = len(self.body)
        layers = sorted({i % n for i in exits})
        if len(layers) != len(exits) or (n - 1) in layers:
            raise ValueError(f"EarlyExit: exit layers {sorted(exits)} must be distinct and before the last of {n}")
        self.exit_layers = layers
        self.exits = nn.ModuleDict({str(i % n): head for i, head in exits.items()})
        self.gates = nn.ModuleDict({str(i % n): g for i, g in gates.items()}) if gates else None
        if (policy == "gate" or objective == "jei") and (self.gates is None or set(self.gates) != set(self.exits)):
            raise ValueError("EarlyExit: policy 'gate' and objective 'jei' need one gate per exit")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"EarlyExit: threshold must be in [0, 1], got {threshold}")
        self.weights = list(weights) if weights is not None else [1.0] * (len(layers) + 1)
        if len(self.weights) != len(layers) + 1:
            raise ValueError(f"EarlyExit: {len(self.weights)} weights for {len(layers)} exits and the final head")
        costs = list(costs) if costs is not None else [(i + 1) / n for i in layers] + [1.0]
        if len(costs) != len(layers) + 1:
            raise ValueError(f"EarlyExit: {len(costs)} costs for {len(layers)} exits and the final head")
        self.policy, self.objective, self.teacher = policy, objective, teacher
        self.temperature, self.distill_weight, self.cost_weight = temperature, distill_weight, cost_weight
        self.register_buffer("threshold", torch.tensor(float(threshold)))
        self.register_buffer("costs", torch.tensor(costs, dtype=torch.float32))
        self.record: ExitRecord | None = None

    # -- scores and per-exit outputs ---------------------------------------------------------

    def score(self, layer: int, logits: Tensor) -> Tensor:
        """Per-sample exit score in [0, 1] of exit ``layer``'s ``logits``. (B, ..., K) -> (B,)."""
        if self.policy == "gate":
            assert self.gates is not None
            return self.gates[str(layer)](logits)
        feats = prediction_features(logits)
        return feats[:, 0] if self.policy == "confidence" else feats[:, 2]

    def all_exits(self, x: Tensor) -> list[Tensor]:
        """Outputs of every exit and then the final head, for every sample (no exiting)."""
        hs = self.body.taps(self.stem(x), [*self.exit_layers, len(self.body) - 1])
        return [self.exits[str(i)](h) for i, h in zip(self.exit_layers, hs, strict=False)] + [self.head(hs[-1])]

    # -- inference -----------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        """Train mode: the full-depth output. Eval mode: per-sample early exit with compaction."""
        if self.training:
            return self.head(self.body(self.stem(x)))
        return self._exit_forward(x)

    def _exit_forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        n = len(self.body)
        rows = torch.arange(h.shape[0], device=h.device)  # original batch position of each live row
        left = torch.full((h.shape[0],), n - 1, dtype=torch.long, device=h.device)
        out: Tensor | None = None
        threshold = float(self.threshold)
        for i, layer in enumerate(self.body.layers):
            h = layer(h)
            if str(i) not in self.exits or not can_exit(threshold):
                continue
            logits = self.exits[str(i)](h)
            leave = choose_exit([self.score(i, logits)], threshold) == 0
            if not bool(leave.any()):
                continue
            if out is None:
                out = logits.new_empty((x.shape[0], *logits.shape[1:]))
            out[rows[leave]] = logits[leave]
            left[rows[leave]] = i
            stay = ~leave
            h, rows = h[stay], rows[stay]  # compaction: later layers see only the staying rows
            if rows.numel() == 0:
                break
        if rows.numel():
            final = self.head(h)
            if out is None:
                out = final
            else:
                out[rows] = final
        self.record = ExitRecord(left, n)
        assert out is not None
        return out

    # -- training ------------------------------------------------------------------------------

    def training_loss(self, x: Tensor, y: Tensor, loss_fn: LossFn) -> Tensor:
        """The training objective (``weighted``, ``distill`` or ``jei``) on one batch."""
        outs = self.all_exits(x)
        w = torch.tensor(self.weights, dtype=outs[-1].dtype, device=outs[-1].device)
        task = torch.stack([loss_fn(z, y) for z in outs])
        if self.objective == "distill":
            a, t = self.distill_weight, self.temperature
            kd = [
                self._kl(z, (outs[-1] if self.teacher == "final" else outs[k + 1]).detach(), t)
                for k, z in enumerate(outs[:-1])
            ]
            task = torch.cat([(1 - a) * task[:-1] + a * torch.stack(kd), task[-1:]])
        loss = (w * task).sum() / w.sum()
        if self.objective == "jei":
            loss = loss + self._gate_loss(outs, y)
        return loss

    @staticmethod
    def _kl(student: Tensor, teacher: Tensor, t: float) -> Tensor:
        s = F.log_softmax(student.flatten(0, -2) / t, dim=-1)
        p = F.softmax(teacher.flatten(0, -2) / t, dim=-1)
        return F.kl_div(s, p, reduction="batchmean") * t * t

    def _gate_loss(self, outs: list[Tensor], y: Tensor) -> Tensor:
        """JEI-DNN's gate objective: expected (per-sample CE + lambda cost) under the exit distribution."""
        assert self.gates is not None
        b = outs[-1].shape[0]
        ce = torch.stack(
            [
                F.cross_entropy(z.detach().flatten(0, -2), y.flatten(), reduction="none").view(b, -1).mean(1)
                for z in outs
            ],
            dim=1,
        )  # (B, exits + 1)
        survive = torch.ones(b, device=ce.device, dtype=ce.dtype)
        probs = []
        for i, z in zip(self.exit_layers, outs, strict=False):
            g = self.gates[str(i)](z.detach())
            probs.append(survive * g)
            survive = survive * (1 - g)
        q = torch.stack([*probs, survive], dim=1)  # (B, exits + 1), rows sum to 1
        return (q * (ce + self.cost_weight * self.costs.to(ce.dtype))).sum(1).mean()


class ExitAt(nn.Module):
    """An early-exit model cut after body layer ``layer``, answering from that exit for every
    sample (the final head after the last layer); no other exit is run.

    Shapes:
        as the wrapped model.
    """

    def __init__(self, model: EarlyExit, layer: int) -> None:
        super().__init__()
        self.model, self.layer = model, layer

    def forward(self, x: Tensor) -> Tensor:
        m = self.model
        h = m.body.taps(m.stem(x), [self.layer])[0]
        return m.head(h) if self.layer == len(m.body) - 1 else m.exits[str(self.layer)](h)
