"""Feature scaling of the user's own arrays, with statistics from the training split only.

A file's ``x`` is used as given unless the dataset's ``scale:`` says otherwise:

- ``none``: ``x`` unchanged (the default; the user has already scaled it, or wants raw values).
- ``standard``: ``(x - mean) / std``, the z-score of scikit-learn's ``StandardScaler``
  (population std, ``ddof=0``).
- ``minmax``: ``(x - min) / (max - min)``, onto [0, 1] on the training split (``MinMaxScaler``).

Statistics are computed on the **training split alone** and the same shift and divisor are
applied to val and test, so no held-out sample leaks into the preprocessing (val/test values may
leave [0, 1] under ``minmax``). They are taken per feature: per column of a table (N, F); per
channel of an image batch (N, C, H, W) (over samples and positions, as torchvision's
``Normalize`` uses them); per position for any other (N, ...) shape. A feature that is constant on
the training split gets divisor 1 (it is only shifted), so nothing is divided by zero.

The statistics are computed in float64 and recorded (:meth:`Scaling.to_dict`) in the dataset's
``preprocess`` and thus in every checkpoint's metadata, so new inputs can be scaled exactly as the
training data was (:func:`apply_scaling`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from brickwork.errors import DataError

#: The ``scale:`` option of the ``npz`` and ``csv`` datasets.
Scale = Literal["none", "standard", "minmax"]


@dataclass(frozen=True)
class Scaling:
    """``x -> (x - shift) / divisor`` per feature; ``shift`` and ``divisor`` broadcast to (1, *in_shape)."""

    kind: Scale
    shift: Tensor  # float64, shape (F,) for tables, (C,) for images, in_shape otherwise
    divisor: Tensor

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON: ``{"kind", "shift", "divisor"}`` (nested lists of floats)."""
        return {"kind": self.kind, "shift": self.shift.tolist(), "divisor": self.divisor.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scaling:
        """The scaling :meth:`to_dict` recorded (from a checkpoint's ``data.preprocess.scale``)."""
        as64 = torch.float64
        return cls(d["kind"], torch.tensor(d["shift"], dtype=as64), torch.tensor(d["divisor"], dtype=as64))


def _reduce_dims(x: Tensor) -> tuple[int, ...]:
    """The dimensions a statistic is taken over: samples, and spatial positions of (N, C, H, W)."""
    return (0, 2, 3) if x.ndim == 4 else (0,)


def fit_scaling(train_x: Tensor, kind: Scale) -> Scaling | None:
    """The statistics of ``kind`` on the training inputs (N, ...); None for ``none``.

    Raises:
        DataError: the training split is empty (there is nothing to take statistics from).
    """
    if kind == "none":
        return None
    if len(train_x) == 0:
        raise DataError("scale: the training split is empty; there are no samples to take statistics from")
    x = train_x.double()
    dims = _reduce_dims(x)
    if kind == "standard":
        shift = x.mean(dims)
        spread = x.var(dims, correction=0).sqrt()
    else:
        shift = x.amin(dims)
        spread = x.amax(dims) - shift
    return Scaling(kind, shift, torch.where(spread > 0, spread, torch.ones_like(spread)))


def apply_scaling(x: Tensor, scaling: Scaling | None) -> Tensor:
    """``x`` (N, ...) scaled by ``scaling`` in float64, returned as float32 (unchanged for None)."""
    if scaling is None:
        return x
    shape = (1, -1, 1, 1) if x.ndim == 4 else (1, *x.shape[1:])
    shift, divisor = scaling.shift.reshape(shape), scaling.divisor.reshape(shape)
    return ((x.double() - shift) / divisor).float()
