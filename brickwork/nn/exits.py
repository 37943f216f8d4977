"""Early exits on any stack model: exit heads by layer index, five training objectives, and
per-sample exiting that removes exited samples from the batch.

Training (:meth:`EarlyExit.training_loss`, called by the training loop):

* ``weighted``: a weighted sum of the exits' task losses and the final head's (the usual
  multi-exit objective, e.g. BranchyNet, Teerapittayanon et al., 2016).
* ``depth_weighted``: ModularStarEncoder's multi-exit loss (Gurioli et al., 2025, "MoSE"): the
  task loss at each exit weighted by its depth, ``sum_i (l_i / L) loss_i`` (the final head at
  weight 1), no teacher: the deeper exits' signal reaches the shallow ones through the shared
  layers. (Their single shared head with a layer-index embedding is not reproduced: brickwork's
  exits have a head each.) The paper calls this self-distillation; it is not a distillation loss.
* ``distill``: multi-exit self-distillation, deeper outputs teach earlier ones: each exit
  minimises ``(1 - a) CE + a T^2 KL(teacher || exit)`` with the final head (or the next deeper
  exit) as a detached teacher (Zhang et al., 2019, "Be Your Own Teacher", BYOT).
* ``jei``: JEI-DNN's joint training (Regol, Chataoui & Coates, ICLR 2024, and their public code,
  ``networkslab/dynn``), in alternating phases of ``phase_steps`` optimizer steps. Gate ``k``
  reads four features of exit ``k``'s detached prediction (:func:`jei_gate_features`) and gives
  ``g_k``; a sample exits at ``k`` with probability ``q_k = g_k prod_{j<k} (1 - g_j)``, at the
  end with ``prod_j (1 - g_j)`` (:func:`exit_distribution`, rows sum to 1). *Heads phase*: each
  head's per-sample loss is weighted by the (detached) probability that the sample exits there,
  ``mean_x sum_k q_k(x) CE_k(x)``, the fix for the train/test mismatch of training every head on
  every sample. *Gates phase*: each sample's best exit ``k* = argmin_k CE_k + lambda c_k`` (heads
  detached) is the target; gates at and after ``k*`` are trained to exit, those before it to
  stay (their "exit subsequent" scheme), binary cross-entropy with the ones up-weighted by the
  zeros-to-ones ratio as their code does. Their code also rescales the heads' weighted loss per
  sample by ``sum_k CE_k / sum_k q_k CE_k`` without detaching the ratio, which makes its
  gradient that of the plain sum; we keep the paper's weighting instead, and say so here.
  Conformal intervals (their per-exit split-conformal quantiles) are not implemented.
* ``joint_gates``: the objective brickwork called ``jei`` before issue 14: heads on the plain
  weighted sum of their losses, gates on the expected cost-aware loss ``sum_k q_k (CE_k + lambda
  c_k)`` with the heads detached, both in every step (three prediction features per gate).

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
ExitObjective = Literal["weighted", "depth_weighted", "distill", "jei", "joint_gates"]
GateFeatures = Literal["prediction", "jei"]
# Objectives that need a gate per exit.
GATED_OBJECTIVES = ("jei", "joint_gates")
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


def jei_gate_features(logits: Tensor) -> Tensor:
    """JEI-DNN's four gate features of a detached prediction, averaged over positions.

    As their ``LearnableUncGate`` (``compute_detached_uncertainty_metrics``): the max
    probability, the entropy (nats), the top-1 minus top-2 margin, and the entropy of the
    squared probabilities renormalised.

    Shapes:
        (B, K) | (B, ..., K) -> (B, 4)
    """
    p = logits.detach().float().softmax(-1)
    top = p.topk(min(2, p.shape[-1]), dim=-1).values
    margin = top[..., 0] - top[..., 1] if p.shape[-1] > 1 else top[..., 0]

    def entropy(q: Tensor) -> Tensor:
        return -(q * q.clamp_min(1e-12).log()).sum(-1)

    sq = p.square()
    feats = torch.stack([top[..., 0], entropy(p), margin, entropy(sq / sq.sum(-1, keepdim=True))], dim=-1)
    return feats.reshape(feats.shape[0], -1, 4).mean(1)


def exit_distribution(gates: Sequence[Tensor]) -> Tensor:
    """(B, G + 1): ``q_k = g_k prod_{j<k} (1 - g_j)`` for the G gates, then ``prod_j (1 - g_j)``.

    The probability that a sample exits at each gate, or reaches the end; each row sums to 1.

    Args:
        gates: G tensors (B,) of exit probabilities in [0, 1], in depth order.
    """
    survive = torch.ones_like(gates[0])
    probs = []
    for g in gates:
        probs.append(survive * g)
        survive = survive * (1 - g)
    return torch.stack([*probs, survive], dim=1)


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

    The gate reads only the exit's prediction, as JEI-DNN's gates read the inference modules'
    outputs, so it is tiny and architecture-agnostic.

    Args:
        features: ``"jei"``: JEI-DNN's four (:func:`jei_gate_features`); ``"prediction"``: the
            three of :func:`prediction_features` (the gates of ``joint_gates`` and ``policy="gate"``).

    Shapes:
        (B, K) | (B, T, K) logits -> (B,) exit probability
    """

    def __init__(
        self,
        features: GateFeatures = "prediction",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.features = features
        self.proj = nn.Linear(4 if features == "jei" else 3, 1, device=device, dtype=dtype)

    def logit(self, logits: Tensor) -> Tensor:
        """(B,) the gate's pre-sigmoid output."""
        f = jei_gate_features(logits) if self.features == "jei" else prediction_features(logits)
        return self.proj(f.to(self.proj.weight.dtype)).squeeze(-1)

    def forward(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(self.logit(logits))


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
        gates: a gate per exit (:class:`ExitGate`), required by ``policy="gate"`` and the
            ``jei`` and ``joint_gates`` objectives.
        policy: the exit score compared with ``threshold`` at inference.
        threshold: initial threshold in [0, 1] (a buffer: an operating point chosen later is
            saved with the weights).
        objective: the training objective (see the module docstring).
        weights: loss weight of each exit and then the final head (default all 1).
        temperature, distill_weight, teacher: self-distillation's T, a, and teacher.
        costs: relative cost of leaving at each exit and at the end (default (i+1)/L; the
            builder passes measured FLOPs fractions), the ``c_k`` of the JEI-DNN gate loss.
        cost_weight: the JEI-DNN ``lambda``, in task-loss units per full-model cost.
        phase_steps: ``jei``: optimizer steps per phase, heads then gates, alternating (their
            code's ``bilevel_batch_count``, 20).

    Shapes:
        as the wrapped model, e.g. (B, C, H, W) -> (B, K) or (B, T) -> (B, T, V).
    """

    threshold: Tensor  # () buffer
    costs: Tensor  # (exits + 1,) buffer
    jei_step: Tensor  # () int64 buffer: training steps taken, which sets the ``jei`` phase

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
        phase_steps: int = 20,
    ) -> None:
        super().__init__(model.stem, model.body, model.head)
        n = len(self.body)
        layers = sorted({i % n for i in exits})
        if len(layers) != len(exits) or (n - 1) in layers:
            raise ValueError(f"EarlyExit: exit layers {sorted(exits)} must be distinct and before the last of {n}")
        self.exit_layers = layers
        self.exits = nn.ModuleDict({str(i % n): head for i, head in exits.items()})
        self.gates = nn.ModuleDict({str(i % n): g for i, g in gates.items()}) if gates else None
        gated = policy == "gate" or objective in GATED_OBJECTIVES
        if gated and (self.gates is None or set(self.gates) != set(self.exits)):
            raise ValueError("EarlyExit: policy 'gate' and objectives 'jei', 'joint_gates' need one gate per exit")
        if objective == "depth_weighted" and weights is not None:
            raise ValueError(
                "EarlyExit: objective 'depth_weighted' sets the weights itself (layer / L); give no weights"
            )
        if phase_steps < 1:
            raise ValueError(f"EarlyExit: phase_steps must be >= 1, got {phase_steps}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"EarlyExit: threshold must be in [0, 1], got {threshold}")
        if objective == "depth_weighted":  # MoSE: alpha_i = l_i / L, l_i the 1-based layer of exit i
            weights = [(i + 1) / n for i in layers] + [1.0]
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
        self.phase_steps = phase_steps
        self.register_buffer("jei_step", torch.zeros((), dtype=torch.long))
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
        """The training objective (see the module docstring) on one batch."""
        outs = self.all_exits(x)
        if self.objective == "jei":
            return self._jei_loss(outs, y)
        w = torch.tensor(self.weights, dtype=outs[-1].dtype, device=outs[-1].device)
        task = torch.stack([loss_fn(z, y) for z in outs])
        if self.objective == "distill":
            a, t = self.distill_weight, self.temperature
            kd = [
                self._kl(z, (outs[-1] if self.teacher == "final" else outs[k + 1]).detach(), t)
                for k, z in enumerate(outs[:-1])
            ]
            task = torch.cat([(1 - a) * task[:-1] + a * torch.stack(kd), task[-1:]])
        if self.objective == "depth_weighted":
            return (w * task).sum()  # MoSE: L = sum_i alpha_i L_i, not renormalised
        loss = (w * task).sum() / w.sum()
        if self.objective == "joint_gates":
            loss = loss + self._gate_loss(outs, y)
        return loss

    def jei_phase(self) -> Literal["heads", "gates"]:
        """The phase of the next ``jei`` step: ``phase_steps`` steps of heads, then of gates, ..."""
        return "heads" if (int(self.jei_step) // self.phase_steps) % 2 == 0 else "gates"

    def gate_values(self, outs: Sequence[Tensor]) -> list[Tensor]:
        """(B,) exit probability of each gate on the (detached) outputs of its exit."""
        assert self.gates is not None
        return [self.gates[str(i)](z.detach()) for i, z in zip(self.exit_layers, outs, strict=False)]

    def per_sample_losses(self, outs: Sequence[Tensor], y: Tensor) -> Tensor:
        """(B, exits + 1) cross-entropy of every exit and the final head per sample (mean over positions)."""
        b = outs[-1].shape[0]
        return torch.stack(
            [F.cross_entropy(z.flatten(0, -2), y.flatten(), reduction="none").view(b, -1).mean(1) for z in outs],
            dim=1,
        )

    def _jei_loss(self, outs: list[Tensor], y: Tensor) -> Tensor:
        """JEI-DNN's step: the heads' exit-probability-weighted loss, or the gates' best-exit loss."""
        phase = self.jei_phase()
        self.jei_step += 1
        ce = self.per_sample_losses(outs, y)  # (B, exits + 1)
        if phase == "heads":
            with torch.no_grad():
                q = exit_distribution(self.gate_values(outs))
            return (q.to(ce.dtype) * ce).sum(1).mean()
        assert self.gates is not None
        gate_logits = []
        for i, z in zip(self.exit_layers, outs, strict=False):
            gate = self.gates[str(i)]
            if not isinstance(gate, ExitGate):
                raise TypeError("EarlyExit(objective='jei'): the gates must be ExitGate (the gate loss needs logits)")
            gate_logits.append(gate.logit(z.detach()))
        logits = torch.stack(gate_logits, 1)  # (B, exits)
        target = jei_gate_targets(ce.detach(), self.costs.to(ce.dtype), self.cost_weight)
        return jei_gate_loss(logits, target)

    @staticmethod
    def _kl(student: Tensor, teacher: Tensor, t: float) -> Tensor:
        s = F.log_softmax(student.flatten(0, -2) / t, dim=-1)
        p = F.softmax(teacher.flatten(0, -2) / t, dim=-1)
        return F.kl_div(s, p, reduction="batchmean") * t * t

    def _gate_loss(self, outs: list[Tensor], y: Tensor) -> Tensor:
        """``joint_gates``' gate objective: expected (per-sample CE + lambda cost) under the exit distribution."""
        ce = self.per_sample_losses([z.detach() for z in outs], y)  # (B, exits + 1)
        q = exit_distribution(self.gate_values(outs)).to(ce.dtype)  # rows sum to 1
        return (q * (ce + self.cost_weight * self.costs.to(ce.dtype))).sum(1).mean()


def jei_gate_targets(ce: Tensor, costs: Tensor, cost_weight: float) -> Tensor:
    """(B,) each sample's best exit: ``argmin_k CE_k + lambda c_k`` over the exits and the end.

    Args:
        ce: (B, G + 1) per-sample losses of each exit and the final head.
        costs: (G + 1,) relative cost of leaving at each.
        cost_weight: lambda.
    """
    return torch.argmin(ce + cost_weight * costs, dim=1)


def jei_gate_loss(gate_logits: Tensor, target: Tensor) -> Tensor:
    """JEI-DNN's gate loss ("exit subsequent" scheme of their code): BCE of every gate's logit
    towards 1 at and after the sample's best exit and 0 before it, the ones up-weighted by the
    zeros-to-ones ratio of the batch (best exit at the end: every gate's target is 0).

    Args:
        gate_logits: (B, G) pre-sigmoid gate outputs.
        target: (B,) best exit in [0, G] (:func:`jei_gate_targets`).
    """
    g = gate_logits.shape[1]
    y = (torch.arange(g, device=target.device)[None, :] >= target[:, None]).to(gate_logits.dtype)  # (B, G)
    ones = y.sum().clamp_min(1.0)
    ratio = (y.numel() - y.sum()) / ones
    weight = torch.where(y > 0, ratio, torch.ones_like(y))
    return (F.binary_cross_entropy_with_logits(gate_logits, y, reduction="none") * weight).mean()


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
