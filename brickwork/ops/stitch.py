"""Stitch the first blocks of one trained model to the last blocks of another.

Pan et al. (2023), "Stitchable Neural Networks" (SN-Net): between two trained models of one
family ("anchors"), a linear stitching layer maps the hidden state of the front model after
``i`` of its layers to the input the back model expects before its layer ``j``. The layer is
initialised by least squares on a batch of real data, then fine-tuned; the stitched models
for different cut points fill in the accuracy-compute range between the two anchors, whose
ends are the anchors themselves.

:func:`stitch` copies the parts it takes, so fine-tuning a stitched model never changes an anchor.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from brickwork.nn.stack import Stack, StackModel


class StitchLayer(nn.Module):
    """A learned linear map of the feature dimension: a 1x1 convolution on (B, C, H, W),
    a linear layer on the last dim of (B, D) or (B, T, D).

    Args:
        d_in: features of the front model's hidden state.
        d_out: features the back model expects.

    Shapes:
        (B, d_in) | (B, T, d_in) | (B, d_in, H, W) -> same with d_out
    """

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, h: Tensor) -> Tensor:
        if h.dim() == 4:
            return self.proj(h.movedim(1, -1)).movedim(-1, 1)
        return self.proj(h)


def _features(h: Tensor) -> Tensor:
    """(N, features) rows: every position of a hidden state is one sample of the map."""
    return (h.movedim(1, -1) if h.dim() == 4 else h).reshape(-1, h.shape[1] if h.dim() == 4 else h.shape[-1])


@torch.no_grad()
def fit_least_squares(layer: StitchLayer, h_front: Tensor, h_back: Tensor) -> float:
    """Set ``layer`` to the least-squares map from ``h_front`` to ``h_back`` (SN-Net's initialisation).

    Solves ``min ||[H_f 1] [W^T; b] - H_b||`` over every sample and position.

    Returns:
        The relative residual ``||fit - H_b|| / ||H_b||``.
    """
    if (
        h_front.shape[0] != h_back.shape[0]
        or (h_front.dim() == 4) != (h_back.dim() == 4)
        or (h_front.dim() == 4 and h_front.shape[2:] != h_back.shape[2:])
        or (h_front.dim() == 3 and h_front.shape[1] != h_back.shape[1])
    ):
        raise ValueError(
            f"stitch: hidden states {tuple(h_front.shape)} and {tuple(h_back.shape)} differ in more "
            "than their feature size"
        )
    a = _features(h_front).double()
    b = _features(h_back).double()
    a1 = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], dim=1)
    sol = torch.linalg.lstsq(a1, b, driver="gelsd").solution  # (d_in + 1, d_out)
    layer.proj.weight.copy_(sol[:-1].t())
    layer.proj.bias.copy_(sol[-1])
    return float((a1 @ sol - b).norm() / b.norm().clamp_min(1e-12))


@torch.no_grad()
def hidden_before(model: StackModel, x: Tensor, layer: int) -> Tensor:
    """The hidden state entering body layer ``layer`` (``layer == len(body)``: the head's input)."""
    h = model.stem(x)
    return h if layer == 0 else model.body.taps(h, [layer - 1])[0]


def stitch(front: StackModel, back: StackModel, front_layers: int, back_from: int, layer: StitchLayer) -> StackModel:
    """``back.head(back.body[back_from:](layer(front.body[:front_layers](front.stem(x)))))``, as copies.

    Args:
        front: model whose stem and first ``front_layers`` body layers are used.
        back: model whose body layers from ``back_from`` and head are used.
        layer: the stitching layer (taken as is, not copied).
    """
    if not 0 <= front_layers <= len(front.body) or not 0 <= back_from <= len(back.body):
        raise ValueError(
            f"stitch: cut ({front_layers}, {back_from}) outside the models' depths "
            f"({len(front.body)}, {len(back.body)})"
        )
    layers = [copy.deepcopy(m) for m in list(front.body.layers)[:front_layers]] + [layer]
    layers += [copy.deepcopy(m) for m in list(back.body.layers)[back_from:]]
    return StackModel(copy.deepcopy(front.stem), Stack(layers), copy.deepcopy(back.head))


def stitched(
    front: StackModel, back: StackModel, front_layers: int, back_from: int, x: Tensor
) -> tuple[StackModel, float]:
    """A stitched model whose stitching layer is fitted by least squares on inputs ``x``.

    Returns:
        The model and the fit's relative residual.
    """
    was = front.training, back.training
    front.eval()
    back.eval()
    try:
        h_f = hidden_before(front, x, front_layers)
        h_b = hidden_before(back, x, back_from)
    finally:
        front.train(was[0])
        back.train(was[1])
    d_in = h_f.shape[1] if h_f.dim() == 4 else h_f.shape[-1]
    d_out = h_b.shape[1] if h_b.dim() == 4 else h_b.shape[-1]
    layer = StitchLayer(d_in, d_out).to(h_f.device)
    residual = fit_least_squares(layer, h_f, h_b)
    return stitch(front, back, front_layers, back_from, layer), residual


def default_cuts(front_depth: int, back_depth: int) -> list[tuple[int, int]]:
    """Cut pairs between the anchors: front layers ``i = 1..front_depth - 1`` joined to the back
    model at the same relative depth (SN-Net pairs blocks at matching positions)."""
    cuts = [(i, max(1, min(back_depth - 1, round(i * back_depth / front_depth)))) for i in range(1, front_depth)]
    return list(dict.fromkeys(cuts))


def family(
    front: StackModel, back: StackModel, x: Tensor, cuts: Sequence[tuple[int, int]] | None = None
) -> list[tuple[str, StackModel, float]]:
    """The stitched family from ``front`` to ``back``: the two anchors at the ends (themselves),
    a least-squares-stitched model per cut between them. Entries are (label, model, residual)."""
    cuts = default_cuts(len(front.body), len(back.body)) if cuts is None else list(cuts)
    out: list[tuple[str, StackModel, float]] = [("front", front, 0.0)]
    for i, j in cuts:
        model, res = stitched(front, back, i, j, x)
        out.append((f"stitch {i}:{j}", model, res))
    out.append(("back", back, 0.0))
    return out
