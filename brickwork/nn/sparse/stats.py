"""Running activation statistics of a group-connected layer, for Hebbian rewiring.

G2GNet's Hebbian rule regrows connections between units (or ensembles) whose activations are
most correlated ("cells that fire together wire together"). Correlations need running first and
second moments; all of them live in buffers, so a checkpoint resumes them exactly.

Two granularities, with costs chosen to stay small against the layer's own matmuls:

* groups: the mean activity of each input and output group (an ensemble's activity), as an
  exponential moving average of means, second moments and the (G_out, G_in) cross moment,
  updated on every training forward: O(B (d_in + d_out) + B G_out G_in).
* edges inside connected blocks: the unit-to-unit cross moment has the compressed weight's
  shape and costs one more batched matmul (as much as a weight gradient), so it is accumulated
  only over a window of training steps just before each topology update, then reset.

Activities are the layer's input (the previous layer's post-activation output) and its output
*before* the nonlinearity that follows it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

_EPS = 1e-8


def _corr(cross: Tensor, mean_a: Tensor, sq_a: Tensor, mean_b: Tensor, sq_b: Tensor) -> Tensor:
    """Pearson correlation from moments; ``cross`` broadcasts against ``mean_a * mean_b``."""
    var_a = (sq_a - mean_a**2).clamp_min(0)
    var_b = (sq_b - mean_b**2).clamp_min(0)
    return (cross - mean_a * mean_b) / (var_a * var_b).sqrt().clamp_min(_EPS)


class ActivationStats(nn.Module):
    """Activation moments of one group-connected layer.

    Args:
        groups_in: G_in.
        groups_out: G_out.
        weight_shape: (G_out, b_out, K) to also keep windowed edge statistics, or None.
        d_in: input width (needed with ``weight_shape``).
        d_out: output width (needed with ``weight_shape``).
        momentum: EMA factor of the group statistics (0.99: about the last 100 steps).
    """

    # Buffers (registered in __init__; the e_* ones only with ``weight_shape``).
    g_seen: Tensor
    g_in_mean: Tensor
    g_in_sq: Tensor
    g_out_mean: Tensor
    g_out_sq: Tensor
    g_cross: Tensor
    e_n: Tensor
    e_x: Tensor
    e_xx: Tensor
    e_y: Tensor
    e_yy: Tensor
    e_xy: Tensor

    def __init__(
        self,
        groups_in: int,
        groups_out: int,
        weight_shape: tuple[int, int, int] | None = None,
        d_in: int = 0,
        d_out: int = 0,
        momentum: float = 0.99,
    ) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("g_seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("g_in_mean", torch.zeros(groups_in))
        self.register_buffer("g_in_sq", torch.zeros(groups_in))
        self.register_buffer("g_out_mean", torch.zeros(groups_out))
        self.register_buffer("g_out_sq", torch.zeros(groups_out))
        self.register_buffer("g_cross", torch.zeros(groups_out, groups_in))
        self.edges = weight_shape is not None
        if weight_shape is not None:
            self.register_buffer("e_n", torch.zeros((), dtype=torch.long))
            self.register_buffer("e_x", torch.zeros(d_in))
            self.register_buffer("e_xx", torch.zeros(d_in))
            self.register_buffer("e_y", torch.zeros(d_out))
            self.register_buffer("e_yy", torch.zeros(d_out))
            self.register_buffer("e_xy", torch.zeros(weight_shape))

    @torch.no_grad()
    def update_groups(self, a_in: Tensor, a_out: Tensor) -> None:
        """Fold in one batch of group activities ``a_in`` (G_in, B) and ``a_out`` (G_out, B)."""
        self.fold_groups(self.group_sums(a_in, a_out))

    @torch.no_grad()
    def group_sums(self, a_in: Tensor, a_out: Tensor) -> list[Tensor]:
        """One batch's sums over its B rows, in the buffers' dtype: [B (a 0-d tensor), sum of
        ``a_in`` (G_in,), of ``a_in**2``, of ``a_out`` (G_out,), of ``a_out**2``, and of the outer
        products (G_out, G_in)]. Sums, not means, so that data parallelism can add the ranks'
        slices (of unequal sizes) into the whole batch's before :meth:`fold_groups`."""
        a_in, a_out = a_in.to(self.g_cross.dtype), a_out.to(self.g_cross.dtype)
        rows = a_in.new_tensor(float(a_in.shape[1]))
        return [rows, a_in.sum(1), (a_in**2).sum(1), a_out.sum(1), (a_out**2).sum(1), a_out @ a_in.t()]

    @torch.no_grad()
    def fold_groups(self, sums: list[Tensor]) -> None:
        """Fold one batch's :meth:`group_sums` into the moving averages (of per-batch means)."""
        rows, *totals = sums
        old = (self.g_in_mean, self.g_in_sq, self.g_out_mean, self.g_out_sq, self.g_cross)
        # The first batch sets the averages (no bias towards the zero initial state).
        w = 0.0 if int(self.g_seen) == 0 else self.momentum
        for o, total in zip(old, totals, strict=True):
            o.mul_(w).add_(total / rows, alpha=1.0 - w)
        self.g_seen += 1

    def group_correlation(self) -> Tensor:
        """(G_out, G_in) correlation of output-group with input-group mean activity."""
        return _corr(
            self.g_cross, self.g_out_mean[:, None], self.g_out_sq[:, None], self.g_in_mean[None], self.g_in_sq[None]
        )

    @torch.no_grad()
    def accumulate_edges(self, xt: Tensor, yt: Tensor, gathered: Tensor) -> None:
        """Add one batch to the edge window (:meth:`edge_sums`, then :meth:`fold_edges`)."""
        self.fold_edges(self.edge_sums(xt, yt, gathered))

    @torch.no_grad()
    def edge_sums(self, xt: Tensor, yt: Tensor, gathered: Tensor) -> list[Tensor]:
        """One batch's edge-window sums: [B, sum of x (d_in,), of x**2, of y (d_out,), of y**2, and
        the (G_out, b_out, K) cross sums inside the connected blocks].

        Args:
            xt: (d_in, B) inputs, feature-major.
            yt: (d_out, B) outputs, feature-major.
            gathered: (G_out, K, B) the inputs each output group reads, in weight column order.
        """
        dtype = self.e_xy.dtype
        xt, yt, gathered = xt.to(dtype), yt.to(dtype), gathered.to(dtype)
        g_out, b_out, _ = self.e_xy.shape
        cross = torch.bmm(yt.reshape(g_out, b_out, -1), gathered.transpose(1, 2))
        rows = xt.new_tensor(float(xt.shape[1]))
        return [rows, xt.sum(1), (xt**2).sum(1), yt.sum(1), (yt**2).sum(1), cross]

    @torch.no_grad()
    def fold_edges(self, sums: list[Tensor]) -> None:
        """Add one batch's :meth:`edge_sums` to the window."""
        rows, *totals = sums
        for buffer, total in zip((self.e_x, self.e_xx, self.e_y, self.e_yy, self.e_xy), totals, strict=True):
            buffer.add_(total)
        self.e_n += int(round(float(rows)))

    def edge_correlation(self, fwd_rows: Tensor) -> Tensor:
        """(G_out, b_out, K) correlation of each unit pair inside the connected blocks.

        Args:
            fwd_rows: (G_out * K,) input unit of each weight column (``BlockPlan.fwd_rows``).
        """
        n = max(int(self.e_n), 1)
        g_out, b_out, k = self.e_xy.shape
        x_mean, x_sq = (self.e_x / n)[fwd_rows].view(g_out, 1, k), (self.e_xx / n)[fwd_rows].view(g_out, 1, k)
        y_mean, y_sq = (self.e_y / n).view(g_out, b_out, 1), (self.e_yy / n).view(g_out, b_out, 1)
        return _corr(self.e_xy / n, y_mean, y_sq, x_mean, x_sq)

    @torch.no_grad()
    def reset_edges(self) -> None:
        """Start a new edge window (after a topology update: the blocks may have changed)."""
        for t in (self.e_x, self.e_xx, self.e_y, self.e_yy, self.e_xy):
            t.zero_()
        self.e_n.zero_()
