"""Linear mode connectivity: loss and accuracy along the straight line between two models.

For two models ``a`` and ``b`` of one architecture, the model at ``alpha`` in [0, 1] has every
floating-point parameter and buffer ``(1 - alpha) * a + alpha * b`` (``torch.lerp``). The ends are
the models themselves (``alpha = 0`` is ``a``, ``alpha = 1`` is ``b``, evaluated as they are, so
the ends equal the models' own evaluation exactly).

Barriers (Frankle et al., 2020, "Linear Mode Connectivity and the Lottery Ticket Hypothesis";
the form of Ainsworth et al., 2023, "Git Re-Basin", ``max_λ L(λ) − ½(L(0) + L(1))``):

- loss barrier: the largest loss on the path minus the mean of the two ends' losses;
- accuracy barrier: the mean of the two ends' accuracies minus the smallest accuracy on the path.

Both are >= 0, since the ends lie on the path (Frankle et al. subtract the *linear interpolation*
of the end losses instead; with near-equal ends the two agree).

Batch norm: running statistics interpolated between two networks do not describe the
activations of the interpolated network ("variance collapse", Jordan et al., 2023, "REPAIR"),
so with ``reset_batches`` given, every *interior* point has its batch-norm statistics
recomputed on those (training) batches as Jordan et al. do: statistics reset, then a cumulative
average (``momentum=None``) over the batches with only the batch-norm modules in train mode
(dropout stays off). The ends keep their own statistics. Without ``reset_batches`` the running
statistics are interpolated like any other buffer. Integer buffers (``num_batches_tracked``,
masks, partitions) are taken from ``a``; those other than ``num_batches_tracked`` must be equal
in both models.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brickwork.data.base import Split
from brickwork.data.batching import batches
from brickwork.errors import BrickworkError
from brickwork.nn.modes import evaluating


@dataclass(frozen=True)
class LinearPath:
    """Loss and accuracy at points along the line from model ``a`` (alpha 0) to ``b`` (alpha 1).

    Attributes:
        alphas: the interpolation weights of ``b``, ascending, 0 and 1 included.
        loss: mean cross-entropy (nats per sample, or per token for language models) at each alpha.
        accuracy: accuracy at each alpha.
        bn_reset: whether interior points had their batch-norm statistics recomputed.
    """

    alphas: list[float]
    loss: list[float]
    accuracy: list[float]
    bn_reset: bool = False

    @property
    def loss_barrier(self) -> float:
        """Largest loss on the path minus the mean of the two ends' losses (>= 0)."""
        return max(self.loss) - 0.5 * (self.loss[0] + self.loss[-1])

    @property
    def accuracy_barrier(self) -> float:
        """Mean of the two ends' accuracies minus the smallest accuracy on the path (>= 0)."""
        return 0.5 * (self.accuracy[0] + self.accuracy[-1]) - min(self.accuracy)

    @property
    def midpoint_accuracy(self) -> float:
        """Accuracy at the alpha nearest 0.5."""
        i = min(range(len(self.alphas)), key=lambda k: abs(self.alphas[k] - 0.5))
        return self.accuracy[i]

    def row(self, label: str) -> dict[str, float | str]:
        """A table row: label, end accuracies and losses, barriers, midpoint accuracy."""
        return {
            "label": label,
            "acc_a": self.accuracy[0],
            "acc_b": self.accuracy[-1],
            "loss_a": self.loss[0],
            "loss_b": self.loss[-1],
            "loss_barrier": self.loss_barrier,
            "accuracy_barrier": self.accuracy_barrier,
            "midpoint_accuracy": self.midpoint_accuracy,
        }


def path_alphas(points: int) -> list[float]:
    """``points`` evenly spaced weights from 0 to 1, both ends included (``points >= 2``)."""
    if points < 2:
        raise BrickworkError(f"linear path: points must be >= 2 (the two ends), got {points}")
    return [i / (points - 1) for i in range(points)]


def check_same_architecture(
    a: nn.Module, b: nn.Module, what: str = "linear path", *, equal_integers: bool = True
) -> None:
    """Raise one clear :class:`BrickworkError` unless ``a`` and ``b`` have the same tensors.

    Same state-dict keys, shapes and dtypes; with ``equal_integers`` (interpolation: integer
    buffers are taken from ``a``) also integer buffers other than ``num_batches_tracked`` equal.
    Alignment passes ``equal_integers=False``: two seeds' integer buffers (rewiring seeds and
    counters) may differ without the architecture differing.
    """
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        only_a, only_b = sorted(sa.keys() - sb.keys()), sorted(sb.keys() - sa.keys())
        raise BrickworkError(
            f"{what}: the two models have different tensors (only in the first: {only_a[:5]}, only in the "
            f"second: {only_b[:5]}); expected two models of one architecture"
        )
    for k, t in sa.items():
        u = sb[k]
        if t.shape != u.shape or t.dtype != u.dtype:
            raise BrickworkError(
                f"{what}: tensor {k!r} is {tuple(t.shape)} {t.dtype} in the first model and {tuple(u.shape)} "
                f"{u.dtype} in the second; expected equal shapes and dtypes"
            )
        if (
            equal_integers
            and not t.is_floating_point()
            and not k.endswith("num_batches_tracked")
            and not torch.equal(t, u)
        ):
            raise BrickworkError(
                f"{what}: integer tensor {k!r} (a mask, partition or index) differs between the two models; "
                "they cannot be interpolated"
            )


@torch.no_grad()
def interpolate(a: nn.Module, b: nn.Module, alpha: float) -> nn.Module:
    """A new model (a copy of ``a``) with floating tensors ``torch.lerp(a, b, alpha)``; inputs untouched.

    Integer buffers come from ``a``. ``alpha = 0`` reproduces ``a`` exactly; at ``alpha = 1``
    the float result ``a + (b - a)`` may differ from ``b`` in the last bit (:func:`linear_path`
    evaluates the ends themselves).
    """
    check_same_architecture(a, b, "interpolate")
    out = copy.deepcopy(a)
    sb = b.state_dict()
    for k, t in out.state_dict().items():  # state_dict tensors share storage with the copy's
        if t.is_floating_point():
            t.copy_(torch.lerp(t, sb[k].to(t.device), alpha))
    return out


@torch.no_grad()
def parameter_distance(a: nn.Module, b: nn.Module) -> float:
    """Euclidean distance between the two models' floating-point tensors, as one flat vector each."""
    check_same_architecture(a, b, "parameter distance")
    sb = b.state_dict()
    total = sum(
        float((t.double() - sb[k].double().to(t.device)).pow(2).sum())
        for k, t in a.state_dict().items()
        if t.is_floating_point()
    )
    return total**0.5


def _has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def reset_batch_norm(model: nn.Module, inputs: Iterable[Tensor]) -> nn.Module:
    """Recompute every batch norm's running statistics of ``model`` (in place) over ``inputs``.

    Statistics are reset and accumulated as a cumulative average (``momentum=None``), with only
    the batch-norm modules in train mode; each module's momentum and every mode are restored.

    Args:
        model: the model, modified in place and returned.
        inputs: (B, ...) input batches on the model's device (training data).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model
    momenta = [m.momentum for m in bns]
    with evaluating(model):
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        seen = 0
        for x in inputs:
            model(x)
            seen += 1
        for m, mom in zip(bns, momenta, strict=True):
            m.momentum = mom
    if not seen:
        raise BrickworkError("reset_batch_norm: no input batches to recompute the statistics from")
    return model


@torch.no_grad()
def evaluate_loss_accuracy(
    model: nn.Module, split: Split, batch_size: int = 256, device: str = "cpu"
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``split`` in eval mode (modes restored).

    Args:
        model: (B, ...) -> logits (B, K), or (B, T, K) for language models with targets (B, T).
        split: the evaluation data, every sample used.
    Returns:
        (loss, accuracy): per sample, or per token when targets are (N, T).
    """
    loss_sum, correct, count = 0.0, 0, 0
    with evaluating(model):
        for x, y in batches(split.x, split.y, batch_size):
            x, y = x.to(device), y.to(device)
            logits = model(x)
            flat, target = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
            loss_sum += float(F.cross_entropy(flat.float(), target, reduction="sum"))
            correct += int((flat.argmax(-1) == target).sum())
            count += target.numel()
    if not count:
        raise BrickworkError("linear path: the evaluation split is empty")
    return loss_sum / count, correct / count


def linear_path(
    a: nn.Module,
    b: nn.Module,
    split: Split,
    *,
    points: int = 25,
    batch_size: int = 256,
    device: str = "cpu",
    reset_batches: Sequence[Tensor] | None = None,
) -> LinearPath:
    """Loss and accuracy of the models on the line from ``a`` to ``b`` (neither is modified).

    Args:
        a: the model at alpha 0.
        b: the model at alpha 1: same tensors (names, shapes, dtypes) as ``a``.
        split: evaluation data (x: (N, ...), y: (N,) or (N, T)).
        points: evaluation points, evenly spaced, both ends included (git re-basin uses 25).
        batch_size: evaluation batch size.
        device: where the models and batches run.
        reset_batches: (B, ...) training input batches; when given and the model has batch
            norm, each interior point's statistics are recomputed on them (see the module notes).

    Returns:
        The :class:`LinearPath`; ``loss_barrier`` and ``accuracy_barrier`` are its barriers.

    Raises:
        BrickworkError: the two models differ in architecture, or ``points < 2``.
    """
    alphas = path_alphas(points)
    check_same_architecture(a, b)
    reset = reset_batches is not None and _has_batch_norm(a)
    losses, accs = [], []
    for i, alpha in enumerate(alphas):
        if i == 0 or i == len(alphas) - 1:
            model = a if i == 0 else b
        else:
            model = interpolate(a, b, alpha)
            if reset:
                assert reset_batches is not None
                reset_batch_norm(model, (x.to(device) for x in reset_batches))
        loss, acc = evaluate_loss_accuracy(model, split, batch_size, device)
        losses.append(loss)
        accs.append(acc)
    return LinearPath(alphas, losses, accs, bn_reset=reset)
