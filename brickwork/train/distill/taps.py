"""Taps by module path: what a model's submodules took in or gave out during one forward pass.

A tap names a submodule by its path in ``model.named_modules()`` (``body.layers.1``,
``head.proj``; ``""`` is the model itself, whose output is the logits) and whether its
``input`` (first positional argument) or ``output`` is read. :class:`TapRecorder` holds forward
hooks on those modules for as long as it is open, so no forward signature widens (the design's
tap contract; stack models also expose taps by layer index, ``nn.stack.Stack.taps``).

A teacher is read through :func:`frozen_teacher` (eval mode, no gradients). When the student's
tapped tensor does not have the teacher's shape, a small learned projection (:func:`adapter`,
FitNets' regressor) maps it there; without one, the mismatch is an error naming both paths and
shapes.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from brickwork.errors import BrickworkError

TapIO = Literal["input", "output"]


@dataclass(frozen=True)
class Tap:
    """One tapped tensor: the ``io`` (input or output) of the module at ``path`` (``""``: the model)."""

    path: str = ""
    io: TapIO = "output"

    def __str__(self) -> str:
        return f"{self.path or '<model>'}:{self.io}"


#: The tap of a model's own output (its logits).
MODEL_OUTPUT = Tap()


def module_at(model: nn.Module, path: str, *, where: str = "tap") -> nn.Module:
    """The submodule of ``model`` at ``path`` (``""``: ``model`` itself).

    Raises:
        BrickworkError: no such path; the message names it and the nearest existing paths.
    """
    modules = dict(model.named_modules())
    if path in modules:
        return modules[path]
    names = [n for n in modules if n]
    close = difflib.get_close_matches(path, names, n=3, cutoff=0.4)
    if not close:  # a wrong last component: show the children of the deepest existing prefix
        parent = path.rsplit(".", 1)[0] if "." in path else ""
        while parent and parent not in modules:
            parent = parent.rsplit(".", 1)[0] if "." in parent else ""
        close = [f"{parent}.{c}" if parent else c for c, _ in modules[parent].named_children()][:5]
    raise BrickworkError(
        f"{where}: {type(model).__name__} has no module at path {path!r}; nearest existing paths: {close}"
    )


def _first_tensor(value: Any) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
        return value[0]
    raise BrickworkError(f"tap: expected a tensor (or a tuple starting with one), got {type(value).__name__}")


class TapRecorder:
    """Forward hooks that record tapped tensors; a context manager (hooks removed on exit).

    Example:
        >>> with TapRecorder(model, [Tap("body.layers.0"), Tap("head.proj", "input")]) as rec:
        ...     logits = model(x)
        >>> h = rec.values[Tap("body.layers.0")]  # (B, D)

    ``values`` holds the tensors of the last forward pass (with their graph, so a student's
    taps carry gradients). Paths are resolved when the recorder is made, so a bad path fails
    before any forward pass.
    """

    def __init__(self, model: nn.Module, taps: Iterable[Tap], *, where: str = "tap") -> None:
        self.values: dict[Tap, Tensor] = {}
        self.model = model
        self._targets = [(tap, module_at(model, tap.path, where=where)) for tap in dict.fromkeys(taps)]
        self._handles: list[RemovableHandle] = []
        # The model's own output needs no hook when the pass goes through :meth:`run`.
        self._output = any(tap == MODEL_OUTPUT for tap, _ in self._targets)
        self._hooked = [(tap, m) for tap, m in self._targets if tap != MODEL_OUTPUT]

    def run(self, *inputs: Any) -> dict[Tap, Tensor]:
        """One forward pass of the model with the hooks on; the tapped tensors (a new dict).

        The model's output tap is read from the return value, not from a hook (logit KD then
        costs no hook at all).
        """
        self.values = {}
        handles = [self._register(tap, m) for tap, m in self._hooked]
        try:
            out = self.model(*inputs)
        finally:
            for h in handles:
                h.remove()
        if self._output:
            self.values[MODEL_OUTPUT] = _first_tensor(out)
        values, self.values = self.values, {}
        return values

    def _register(self, tap: Tap, module: nn.Module) -> RemovableHandle:
        if tap.io == "input":
            return module.register_forward_pre_hook(self._pre(tap))
        return module.register_forward_hook(self._post(tap))

    def __enter__(self) -> TapRecorder:
        self._handles = [self._register(tap, module) for tap, module in self._targets]
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _pre(self, tap: Tap) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            self.values[tap] = _first_tensor(args)

        return hook

    def _post(self, tap: Tap) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            self.values[tap] = _first_tensor(output)

        return hook


def frozen_teacher(teacher: nn.Module) -> nn.Module:
    """``teacher`` in eval mode with every parameter's ``requires_grad`` off (in place; returned).

    Eval mode: batch norm uses its running statistics, dropout is off, routers take their
    deterministic path, so a teacher's output for a sample depends on that sample alone.
    """
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


class FlatProjection(nn.Module):
    """A linear map between per-sample tensors of any shapes: flatten, Linear, reshape.

    Shapes:
        (B, *in_shape) -> (B, *out_shape)
    """

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.out_shape = out_shape
        self.proj = nn.Linear(math.prod(in_shape), math.prod(out_shape))

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x.flatten(1)).reshape(len(x), *self.out_shape)


def adapter(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> nn.Module:
    """A learned projection from student features to the teacher's shape (FitNets' regressor).

    Per-sample shapes (no batch dim). Feature maps of equal spatial size get a 1x1 convolution
    (C_s -> C_t), tensors that differ only in the last dim a Linear on it ((B, D) and (B, T, D));
    anything else a :class:`FlatProjection`.
    """
    if len(student_shape) == len(teacher_shape) == 3 and student_shape[1:] == teacher_shape[1:]:
        return nn.Conv2d(student_shape[0], teacher_shape[0], kernel_size=1)
    if len(student_shape) == len(teacher_shape) and student_shape[:-1] == teacher_shape[:-1]:
        return nn.Linear(student_shape[-1], teacher_shape[-1])
    return FlatProjection(student_shape, teacher_shape)
