"""SEMA bricks: a self-expanding mixture of adapters on a frozen layer (Wang et al., CVPR 2025, arXiv 2403.18886).

SEMA ("Self-Expansion of pre-trained models with Modularized Adaptation") attaches to each
adapted layer of a frozen backbone a set of *modular adapters*, each a functional adapter (down
projection, ReLU, up projection, a side branch beside the layer) paired with a *representation
descriptor* (a small autoencoder on the layer's input). A descriptor learns the input
distribution its adapter was trained on; on a new task the z-score of its reconstruction loss
tells whether the data has shifted. When every descriptor of a layer flags a shift, a new adapter
is added there and the *expandable router* (a linear map from the mean input to one logit per
adapter, softmax-weighted mixture) gets a new row; otherwise the existing adapters are reused.

The bricks here hold the state (adapters, descriptors and their loss statistics, router rows);
the decisions (when to expand, what trains) are the continual-learning loop's, ``train.sema``.

Simplifications, named: the descriptor's loss statistics are computed in one pass over the task's
training inputs after its adapter trained (the paper keeps a running buffer of recent losses
during training); the adapter branch is added to the output of the whole frozen layer (the paper
places it beside a ViT block's MLP).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _per_sample(x: Tensor) -> Tensor:
    """Mean over every dim but the batch: (B, ...) -> (B,)."""
    return x.flatten(1).mean(1)


def _pooled(x: Tensor) -> Tensor:
    """(B, D) as is, (B, T, D) mean over tokens: the router's and descriptor's view of a sample."""
    return x if x.dim() == 2 else x.flatten(1, -2).mean(1)


class Adapter(nn.Module):
    """Bottleneck adapter ``up(relu(down(x)))`` with ``up`` zero-initialised (adds nothing at first).

    Shapes:
        (..., D) -> (..., D)
    """

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, rank)
        self.up = nn.Linear(rank, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(torch.relu(self.down(x)))


class Descriptor(nn.Module):
    """Representation descriptor: an autoencoder on the (pooled) layer input and its loss statistics.

    While ``learning`` is set, each forward pass leaves its mean reconstruction loss in
    ``aux_losses["sema_descriptor"]`` (the training loop adds it to the objective); the input is
    detached so the descriptor only describes the features, it does not shape them.

    Buffers ``loss_mean`` / ``loss_std`` hold the statistics of the per-sample loss on the data its
    adapter was trained on (:meth:`fit_statistics`); :meth:`z_scores` measures new inputs against them.
    """

    loss_mean: Tensor
    loss_std: Tensor

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        self.encoder = nn.Linear(dim, rank)
        self.decoder = nn.Linear(rank, dim)
        self.register_buffer("loss_mean", torch.zeros(()))
        self.register_buffer("loss_std", torch.ones(()))
        self.learning = False
        self.aux_losses: dict[str, Tensor] = {}

    def losses(self, x: Tensor) -> Tensor:
        """Per-sample reconstruction loss (mean squared error over features) of input ``x``: (B, ...) -> (B,)."""
        h = _pooled(x)
        return _per_sample((self.decoder(torch.relu(self.encoder(h))) - h) ** 2)

    def forward(self, x: Tensor) -> None:
        self.aux_losses = {"sema_descriptor": self.losses(x.detach()).mean()} if self.learning else {}

    @torch.no_grad()
    def fit_statistics(self, losses: Tensor) -> None:
        """Set the reference statistics from per-sample losses (N,) on the adapter's own data."""
        self.loss_mean.copy_(losses.mean())
        self.loss_std.copy_(losses.std().clamp_min(1e-8))

    @torch.no_grad()
    def z_scores(self, x: Tensor) -> Tensor:
        """``|loss - mean| / std`` per sample of ``x``: (B, ...) -> (B,)."""
        return (self.losses(x) - self.loss_mean).abs() / self.loss_std


class SEMALayer(nn.Module):
    """A frozen layer plus a router-weighted mixture of modular adapters beside it.

    ``y = base(x) + sum_k g_k(x) * adapter_k(x)`` with ``g = softmax(router(pooled x))``; with no
    adapter it is ``base(x)`` exactly. :meth:`add_adapter` adds an adapter, its descriptor and
    one router row (so earlier rows, frozen with their adapters, keep their values).

    Args:
        base: the backbone layer, (..., D) -> (..., D); it is not changed.
        dim: D.
        rank: adapter bottleneck width.
        descriptor_rank: autoencoder code width.

    Shapes:
        (B, D) or (B, T, D) -> the same.
    """

    def __init__(self, base: nn.Module, dim: int, rank: int, descriptor_rank: int) -> None:
        super().__init__()
        self.base = base
        self.dim, self.rank, self.descriptor_rank = dim, rank, descriptor_rank
        self.adapters = nn.ModuleList()
        self.descriptors = nn.ModuleList()
        self.router = nn.ModuleList()  # one Linear(D, 1) per adapter: the expandable router's rows

    def __len__(self) -> int:
        return len(self.adapters)

    def add_adapter(self) -> int:
        """Append an adapter, its descriptor and its router row (on the base layer's device); returns its index."""
        ref = next(self.base.parameters(), None)
        device = ref.device if ref is not None else None
        self.adapters.append(Adapter(self.dim, self.rank).to(device))
        self.descriptors.append(Descriptor(self.dim, self.descriptor_rank).to(device))
        self.router.append(nn.Linear(self.dim, 1).to(device))
        return len(self.adapters) - 1

    def gates(self, x: Tensor) -> Tensor:
        """Mixture weights (B, K) of the adapters for input ``x``."""
        h = _pooled(x)
        return torch.softmax(torch.cat([row(h) for row in self.router], dim=-1), dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if not self.adapters:
            return y
        for d in self.descriptors:
            d(x)
        g = self.gates(x)
        for k, adapter in enumerate(self.adapters):
            y = y + g[:, k].view(-1, *([1] * (x.dim() - 1))) * adapter(x)
        return y

    @torch.no_grad()
    def shift_score(self, x: Tensor) -> float:
        """SEMA's expansion signal: the smallest, over adapters, of the mean z-score on ``x``; inf without adapters."""
        if not self.descriptors:
            return float("inf")
        descriptors: list[Descriptor] = list(self.descriptors)  # type: ignore[arg-type]
        return min(float(d.z_scores(x).mean()) for d in descriptors)


class TaskHeads(nn.Module):
    """One linear head per task, outputs concatenated in task order: class-incremental logits.

    Args:
        dim: input width D.
        classes: classes of each task so far (more are added by :meth:`add_task`).

    Shapes:
        (B, D) -> (B, sum(classes))
    """

    def __init__(self, dim: int, classes: list[int] | None = None) -> None:
        super().__init__()
        self.dim = dim
        self.heads = nn.ModuleList()
        self._classes: list[int] = []
        for n in classes or []:
            self.add_task(n)

    def add_task(self, classes: int) -> int:
        """Append a head for a task of ``classes`` classes; returns the task's index."""
        ref = next(iter(self.heads.parameters()), None)
        self.heads.append(nn.Linear(self.dim, classes).to(ref.device if ref is not None else None))
        self._classes.append(classes)
        return len(self.heads) - 1

    @property
    def classes(self) -> list[int]:
        """Classes of each task, in order."""
        return list(self._classes)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([h(x) for h in self.heads], dim=-1)
