"""Distillation losses: plain functions of (student, teacher[, target]) tensors, and their registry.

Each function is the formula of its paper (or of the authors' code, where the two disagree;
the docstring says which and the other is offered as an option). All reduce to a scalar; the
tests check every one against a hand computation in float64 to 1e-10.

The registry kind ``distill_loss`` names loss *factories*: ``REGISTRY.get("distill_loss",
name).obj(**args)`` returns a :data:`PairLoss`, a callable ``(student, teacher, target) ->
scalar`` over the tapped tensors (logits for ``logit_kd``, ``dist`` and ``labels``; features for
``hint``, ``attention`` and ``relational``). A distillation objective is a weighted sum of such
terms (:mod:`brickwork.train.distill.objective`); configs name the terms, never code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from brickwork.errors import BrickworkError
from brickwork.registry import register

#: A distillation term over tapped tensors: ``(student, teacher, target) -> scalar``.
PairLoss = Callable[[Tensor, Tensor, Tensor], Tensor]

AttentionMode = Literal["code", "paper"]

Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]


def _rows(logits: Tensor) -> Tensor:
    """(..., K) logits as (N, K) rows: a (B, T, V) language model's positions are samples too."""
    return logits.reshape(-1, logits.shape[-1])


def check_same_space(student: Tensor, teacher: Tensor, what: str) -> None:
    """Refuse logits of different output spaces (shapes), naming both."""
    if student.shape != teacher.shape:
        raise BrickworkError(
            f"{what}: student outputs {tuple(student.shape)} and teacher outputs {tuple(teacher.shape)} "
            "are not the same output space; logit distillation needs a teacher with the student's classes"
        )


def kd_divergence(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """tau^2 * KL(softmax(teacher / tau) || softmax(student / tau)), mean over samples (rows).

    Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network": the soft
    targets' gradients scale as 1/tau^2, so the term is multiplied by tau^2 to keep its weight
    comparable across temperatures. ``batchmean``: summed over classes, averaged over the N
    rows (B samples, or B*T positions of a language model), as torchdistill's ``KDLoss``.

    Args:
        student, teacher: (B, K) or (B, T, K) logits.
    """
    check_same_space(student, teacher, "logit KD")
    s, t = _rows(student), _rows(teacher)
    log_p_s = F.log_softmax(s / temperature, dim=-1)
    log_p_t = F.log_softmax(t / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean()
    return kl * temperature**2


def logit_kd(
    student: Tensor, teacher: Tensor, target: Tensor, temperature: float = 4.0, alpha: float = 0.5, beta: float = 0.5
) -> Tensor:
    """Hinton et al. (2015) knowledge distillation: alpha * CE(student, y) + beta * tau^2 * KL.

    Args:
        student, teacher: (B, K) or (B, T, K) logits of one output space.
        target: (B,) or (B, T) class ids.
        temperature: tau, the softening of both distributions in the KL term (CE is at tau=1).
        alpha: weight of the hard-label cross-entropy (mean over rows).
        beta: weight of the soft-target term (:func:`kd_divergence`).
    """
    ce = F.cross_entropy(_rows(student), target.reshape(-1))
    return alpha * ce + beta * kd_divergence(student, teacher, temperature)


def hint(student: Tensor, teacher: Tensor) -> Tensor:
    """FitNets' hint loss (Romero et al., 2015): regression of the teacher's hint layer.

    The paper's eq. 3 is 1/2 ||u_h(x) - r(v_g(x))||^2 with ``r`` a learned regressor on the
    student's guided layer (the tap's adapter, :mod:`brickwork.train.distill.taps`); as in
    torchdistill and most reimplementations the squared error is averaged over every element
    (``MSELoss``), so the term's scale does not grow with the feature size.

    Args:
        student: (B, ...) the adapted student features; teacher: (B, ...) of the same shape.
    """
    if student.shape != teacher.shape:
        raise BrickworkError(
            f"hint: student features {tuple(student.shape)} and teacher features {tuple(teacher.shape)} "
            "differ; set adapter: true on the term to learn a projection"
        )
    return (student - teacher).pow(2).mean()


def attention_map(features: Tensor) -> Tensor:
    """Activation-based spatial attention (Zagoruyko & Komodakis, 2017): F(A) = mean_c A_c^2, L2-normalised.

    The paper sums over channels and the authors' code averages; after the normalisation both
    are the same map.

    Args:
        features: (B, C, H, W) feature maps, or (B, T, D) token states (channels last).

    Returns:
        (B, H*W) or (B, T): one unit-norm attention vector per sample.
    """
    if features.dim() == 4:
        energy = features.pow(2).mean(1).flatten(1)
    elif features.dim() == 3:
        energy = features.pow(2).mean(-1)
    else:
        raise BrickworkError(
            f"attention transfer: features {tuple(features.shape)} have no spatial positions; "
            "tap a (B, C, H, W) or (B, T, D) tensor"
        )
    return F.normalize(energy, dim=1)


def attention_transfer(student: Tensor, teacher: Tensor, mode: AttentionMode = "code") -> Tensor:
    """Attention transfer (AT) between one pair of layers, with p = 2.

    ``code`` (the default) is the authors' code (szagoruyko/attention-transfer ``at_loss``):
    ``(Q_s - Q_t).pow(2).mean()``, the squared difference averaged over samples and positions,
    with which the paper's results were produced (there with weight beta = 1000 / 2 per pair).
    ``paper`` is the paper's eq. 2: ``|| Q_s - Q_t ||_2`` per sample (a norm, not squared),
    averaged over the batch. The two differ in scale and in gradient; torchdistill's ``ATLoss``
    warns of the same disagreement and offers both.

    Args:
        student, teacher: features with the same positions, see :func:`attention_map`.
    """
    qs, qt = attention_map(student), attention_map(teacher)
    if qs.shape != qt.shape:
        raise BrickworkError(
            f"attention transfer: student positions {tuple(student.shape)} and teacher positions "
            f"{tuple(teacher.shape)} differ; tap layers of the same spatial size"
        )
    if mode == "paper":
        return (qs - qt).norm(dim=1).mean()
    return (qs - qt).pow(2).mean()


def _pairwise_distances(e: Tensor, eps: float = 1e-12) -> Tensor:
    """(B, B) Euclidean distances of the rows of ``e`` (B, F), zero on the diagonal (RKD's ``pdist``)."""
    sq = e.pow(2).sum(1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps).sqrt()
    return d * (1 - torch.eye(len(e), dtype=e.dtype, device=e.device))


def rkd_distance(student: Tensor, teacher: Tensor) -> Tensor:
    """RKD distance loss (Park et al., 2019): Huber between mean-normalised pairwise distances.

    psi_D(t_i, t_j) = ||t_i - t_j|| / mu, mu the mean distance over pairs i != j; the loss is the
    smooth-L1 (Huber, delta = 1) between the student's and the teacher's psi_D. As the authors'
    code (lenscloth/RKD), the Huber terms are averaged over all B^2 ordered pairs, diagonal
    included (the paper writes a sum over pairs).

    Args:
        student, teacher: (B, ...) embeddings, flattened per sample; widths may differ.
    """
    s, t = student.flatten(1), teacher.flatten(1)
    ds, dt = _pairwise_distances(s), _pairwise_distances(t)
    ds = ds / ds[ds > 0].mean()
    dt = dt / dt[dt > 0].mean()
    return F.smooth_l1_loss(ds, dt)


def rkd_angle(student: Tensor, teacher: Tensor) -> Tensor:
    """RKD angle loss (Park et al., 2019): Huber between cosines of the angles of every triplet.

    psi_A(t_i, t_j, t_k) = <e_ij, e_kj>, e_ij = (t_i - t_j) / ||t_i - t_j||. As the authors'
    code, the Huber terms are averaged over all B^3 ordered triplets (degenerate ones, where the
    difference is zero, give 0 for both models).

    Args:
        student, teacher: (B, ...) embeddings, flattened per sample; widths may differ.
    """

    def cosines(e: Tensor) -> Tensor:
        diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)  # [a, b] = e_b - e_a
        return torch.bmm(diff, diff.transpose(1, 2)).reshape(-1)

    return F.smooth_l1_loss(cosines(student.flatten(1)), cosines(teacher.flatten(1)))


def relational_kd(student: Tensor, teacher: Tensor, distance: float = 25.0, angle: float = 50.0) -> Tensor:
    """RKD-DA (Park et al., 2019): ``distance`` * :func:`rkd_distance` + ``angle`` * :func:`rkd_angle`.

    The defaults are the paper's lambda_D = 25 and lambda_A = 50 (metric learning).
    """
    out = student.new_zeros(())
    if distance:
        out = out + distance * rkd_distance(student, teacher)
    if angle:
        out = out + angle * rkd_angle(student, teacher)
    return out


def _pearson_rows(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b`` (DIST's code, eps included)."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_kd(
    student: Tensor, teacher: Tensor, temperature: float = 1.0, inter: float = 1.0, intra: float = 1.0
) -> Tensor:
    """DIST (Huang et al., 2022, "Knowledge Distillation from A Stronger Teacher").

    With Y = softmax(z / tau) of shape (B, K): the inter-class loss is 1 - mean over samples
    of the Pearson correlation between the student's and teacher's rows; the intra-class loss
    the same over columns (classes); both times tau^2. As the authors' code (hunto/DIST_KD),
    the correlation's denominator has eps = 1e-8.

    Args:
        student, teacher: (B, K) or (B, T, K) logits of one output space (rows are samples).
        temperature: tau.
        inter: beta, weight of the inter-class relation.
        intra: gamma, weight of the intra-class relation.
    """
    check_same_space(student, teacher, "DIST")
    ys = F.softmax(_rows(student) / temperature, dim=1)
    yt = F.softmax(_rows(teacher) / temperature, dim=1)
    inter_loss = 1 - _pearson_rows(ys, yt).mean()
    intra_loss = 1 - _pearson_rows(ys.t(), yt.t()).mean()
    return temperature**2 * (inter * inter_loss + intra * intra_loss)


# ---- registry: factories of PairLoss, the names a config uses -------------------------------


@register("distill_loss", "labels")
def labels_term() -> PairLoss:
    """Cross-entropy of the student's logits with the labels (the teacher's tensor is unused)."""
    return lambda s, t, y: F.cross_entropy(_rows(s), y.reshape(-1))


@register("distill_loss", "logit_kd")
def logit_kd_term(temperature: Positive = 4.0, alpha: NonNegative = 0.5, beta: NonNegative = 0.5) -> PairLoss:
    """Hinton KD on logits: alpha * CE + beta * tau^2 * KL (batch mean)."""
    return lambda s, t, y: logit_kd(s, t, y, temperature, alpha, beta)


@register("distill_loss", "hint")
def hint_term() -> PairLoss:
    """FitNets hint: mean squared error between (adapted) student and teacher features."""
    return lambda s, t, y: hint(s, t)


@register("distill_loss", "attention")
def attention_term(mode: AttentionMode = "code") -> PairLoss:
    """Attention transfer between feature maps (``code``: the authors' code; ``paper``: eq. 2)."""
    return lambda s, t, y: attention_transfer(s, t, mode)


@register("distill_loss", "relational")
def relational_term(distance: NonNegative = 25.0, angle: NonNegative = 50.0) -> PairLoss:
    """Relational KD: distance and angle losses between embeddings (RKD-DA)."""
    return lambda s, t, y: relational_kd(s, t, distance, angle)


@register("distill_loss", "dist")
def dist_term(temperature: Positive = 1.0, inter: NonNegative = 1.0, intra: NonNegative = 1.0) -> PairLoss:
    """DIST: inter- and intra-class Pearson correlation of softened predictions."""
    return lambda s, t, y: dist_kd(s, t, temperature, inter, intra)


#: The terms that compare logits (their taps default to the models' outputs and must share an output space).
LOGIT_TERMS = frozenset({"labels", "logit_kd", "dist"})
