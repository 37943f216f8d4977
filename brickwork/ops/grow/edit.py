"""Replacing the tensors of a module by resized ones, keeping its class, device, dtype and flags.

Every growth operation works on a copy of the model and, per module, swaps its parameters and
buffers for grown tensors: a parameter stays a parameter (its ``requires_grad`` kept), a buffer
a buffer, and the size attributes the module's ``forward`` or ``extra_repr`` read are updated.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def set_tensor(module: nn.Module, name: str, value: Tensor) -> None:
    """Replace parameter or buffer ``name`` (a direct attribute) of ``module`` by ``value`` (in place).

    Raises:
        AttributeError: ``module`` has no such parameter or buffer.
    """
    value = value.detach()
    if name in module._parameters:
        old = module._parameters[name]
        module._parameters[name] = nn.Parameter(value.clone(), requires_grad=old is None or old.requires_grad)
    elif name in module._buffers:
        module._buffers[name] = value.clone()
    else:
        raise AttributeError(f"{type(module).__name__} has no parameter or buffer {name!r}")


def resize(module: nn.Module, tensors: dict[str, Tensor], **attrs: Any) -> nn.Module:
    """``module`` (edited in place) with ``tensors`` swapped in and size attributes ``attrs`` set."""
    with torch.no_grad():
        for name, value in tensors.items():
            set_tensor(module, name, value)
    for k, v in attrs.items():
        setattr(module, k, v)
    return module


def linear_sizes(module: nn.Module) -> dict[str, str]:
    """The size attributes of a linear-like module: ``{"out": ..., "in": ...}`` attribute names."""
    if hasattr(module, "in_features"):
        return {"out": "out_features", "in": "in_features"}
    if hasattr(module, "in_channels"):
        return {"out": "out_channels", "in": "in_channels"}
    return {"out": "c_out", "in": "c_in"}  # NestedConv2d


def grow_weight_axis(module: nn.Module, dim: int, weight: Tensor, bias: Tensor | None) -> nn.Module:
    """A linear or convolution (edited in place) with new ``weight`` and ``bias`` (None: unchanged);
    its size attribute for ``dim`` (0 out, 1 in) follows the weight."""
    sizes = linear_sizes(module)
    tensors = {"weight": weight} | ({"bias": bias} if bias is not None else {})
    return resize(module, tensors, **{sizes["out" if dim == 0 else "in"]: weight.shape[dim]})


def tensor(module: nn.Module, name: str) -> Tensor | None:
    """Parameter or buffer ``name`` of ``module``, or None (typed: ``Module.__getattr__`` is not)."""
    value = getattr(module, name, None)
    return value if isinstance(value, Tensor) else None


def weight(module: nn.Module) -> Tensor:
    """``module.weight``, which a linear-like module must have."""
    w = tensor(module, "weight")
    if w is None:
        raise TypeError(f"{type(module).__name__} has no weight")
    return w


def zero_(module: nn.Module, *names: str) -> None:
    """Set the named parameters (or buffers) of ``module`` that exist to zero, in place."""
    with torch.no_grad():
        for name in names:
            t = tensor(module, name)
            if t is not None:
                t.zero_()
