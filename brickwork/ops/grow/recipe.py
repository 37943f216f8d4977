"""One growth step as plain data: the settings a ``grow`` stage validates, records and replays.

:class:`GrowSettings` names an operation of :mod:`brickwork.ops.grow` and its arguments (flat keys
in a config); :meth:`GrowSettings.check` refuses, before any work, a missing argument, an
argument the operation does not take, and a mode it does not have. :func:`apply_grow` runs it;
the recipe a stage records is :meth:`GrowSettings.recipe`, and :func:`replay_grow` rebuilds the
grown structure from it on a freshly built model (in place; the weights are loaded afterwards).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import pydantic
from pydantic.dataclasses import dataclass
from torch import nn

from brickwork.errors import ConfigError
from brickwork.ops.grow.depth import deepen, residual_ffn_block
from brickwork.ops.grow.experts import add_experts, split_expert
from brickwork.ops.grow.heads import add_heads
from brickwork.ops.grow.residual import widen_residual
from brickwork.ops.grow.width import out_width, stack_model, widen_ffn, widen_layers

GrowOp = Literal["deepen", "widen_layers", "widen_ffn", "widen_residual", "add_heads", "add_experts", "split_expert"]
Block = Literal["copy", "residual_ffn"]
Mode = Literal["split", "zero", "unchosen", "copy"]
Positive = Annotated[int, pydantic.Field(ge=1)]

# Which arguments each operation takes (beyond ``op`` and ``seed``), which it needs, and its modes.
_TAKES: dict[str, set[str]] = {
    "deepen": {"position", "like", "block", "hidden"},
    "widen_layers": {"width", "positions", "mode"},
    "widen_ffn": {"hidden", "layers", "mode"},
    "widen_residual": {"factor"},
    "add_heads": {"heads", "layers", "mode"},
    "add_experts": {"count", "layers", "mode", "logit"},
    "split_expert": {"layer", "expert"},
}
_NEEDS = {
    "deepen": {"position"},
    "widen_layers": {"width"},
    "widen_ffn": {"hidden"},
    "widen_residual": {"factor"},
    "add_heads": {"heads"},
    "add_experts": {"count"},
    "split_expert": {"layer", "expert"},
}
_MODES = {
    "widen_layers": ("split", "zero"),
    "widen_ffn": ("split", "zero"),
    "add_heads": ("zero", "split"),
    "add_experts": ("unchosen", "copy"),
}


@dataclass(frozen=True, config=pydantic.ConfigDict(extra="forbid"))
class GrowSettings:
    """One function-preserving growth step.

    Attributes:
        op: the operation (``deepen``, ``widen_layers``, ``widen_ffn``, ``widen_residual``,
            ``add_heads``, ``add_experts``, ``split_expert``).
        position: ``deepen``: where the new body layer goes (0 .. depth; -1 at the end).
        like: ``deepen``: the body layer to copy (default the one before ``position``).
        block: ``deepen``: ``copy`` a layer, or insert a ``residual_ffn`` block of ``hidden`` units.
        hidden: ``widen_ffn``: the new FFN width; ``deepen`` with ``residual_ffn``: its width.
        width: ``widen_layers``: the new width of every chosen representation.
        positions: ``widen_layers``: representations to widen (0 the stem's output; default all).
        layers: ``widen_ffn``, ``add_heads``, ``add_experts``: body layers (default all).
        factor: ``widen_residual``: every stream dimension copied this many times.
        heads: ``add_heads``: the new head count.
        count: ``add_experts``: experts added per layer.
        logit: ``add_experts`` (``unchosen``): the new experts' router bias.
        layer, expert: ``split_expert``: which expert of which body layer splits in two.
        mode: ``split`` / ``zero`` (widths, heads), ``unchosen`` / ``copy`` (experts).
        seed: the Net2Net map and the new weights.
    """

    op: GrowOp
    position: int | None = None
    like: int | None = None
    block: Block = "copy"
    hidden: Positive | None = None
    width: Positive | None = None
    positions: list[int] | None = None
    layers: list[int] | None = None
    factor: Annotated[int, pydantic.Field(ge=2)] | None = None
    heads: Positive | None = None
    count: Positive | None = None
    logit: float = -30.0
    layer: int | None = None
    expert: Annotated[int, pydantic.Field(ge=0)] | None = None
    mode: Mode | None = None
    seed: int = 0

    def check(self, path: str = "") -> None:
        """Refuse an argument ``op`` does not take (unless at its default), a missing one, or a foreign mode.

        Raises:
            ConfigError: naming the key, e.g. ``stages[1].width``.
        """
        default = GrowSettings(op=self.op)
        takes = _TAKES[self.op]
        for f in dataclasses.fields(self):
            name = f.name
            if name in ("op", "seed") or name in takes:
                continue
            if getattr(self, name) != getattr(default, name):
                raise ConfigError(
                    _key(path, name),
                    f"is not an argument of grow op {self.op!r} (it takes {sorted(takes)})",
                    getattr(self, name),
                )
        for name in sorted(_NEEDS[self.op]):
            if getattr(self, name) is None:
                raise ConfigError(_key(path, name), f"grow op {self.op!r} needs it", show_value=False)
        if self.mode is not None and self.mode not in _MODES.get(self.op, ()):
            raise ConfigError(_key(path, "mode"), f"grow op {self.op!r} has modes {list(_MODES[self.op])}", self.mode)
        if self.op == "deepen" and self.block == "residual_ffn" and self.hidden is None:
            raise ConfigError(_key(path, "hidden"), "a residual_ffn block needs its hidden width", show_value=False)

    def recipe(self) -> dict[str, Any]:
        """The structural recipe a stage records (plain JSON): ``{"op": "grow", "step": {...}}``."""
        return {"op": "grow", "step": dataclasses.asdict(self)}


def _key(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def apply_grow(model: nn.Module, s: GrowSettings, in_place: bool = False) -> nn.Module:
    """``model`` grown by the step ``s`` (a copy unless ``in_place``).

    Raises:
        BrickworkError: the model does not admit the step (the operation's own one-line message).
    """
    modes: dict[str, Any] = {} if s.mode is None else {"mode": s.mode}
    if s.op == "deepen":
        block = None
        if s.block == "residual_ffn":
            m = stack_model(model, "deepen")
            n = len(m.body)
            pos = s.position if s.position is not None and s.position >= 0 else n + 1 + (s.position or 0)
            prev = m.body.layers[pos - 1] if 0 < pos <= n else m.stem
            dim = out_width(prev, "stem" if pos <= 0 else f"body.layers.{pos - 1}")
            block = residual_ffn_block(dim, s.hidden or dim, like=m)
        assert s.position is not None
        return deepen(model, s.position, block=block, like=s.like, in_place=in_place)
    if s.op == "widen_layers":
        assert s.width is not None
        return widen_layers(model, s.width, s.positions, seed=s.seed, in_place=in_place, **modes)
    if s.op == "widen_ffn":
        assert s.hidden is not None
        return widen_ffn(model, s.hidden, s.layers, seed=s.seed, in_place=in_place, **modes)
    if s.op == "widen_residual":
        assert s.factor is not None
        return widen_residual(model, s.factor, in_place=in_place)
    if s.op == "add_heads":
        assert s.heads is not None
        return add_heads(model, s.heads, s.layers, seed=s.seed, in_place=in_place, **modes)
    if s.op == "add_experts":
        assert s.count is not None
        return add_experts(model, s.count, s.layers, logit=s.logit, seed=s.seed, in_place=in_place, **modes)
    assert s.layer is not None and s.expert is not None
    return split_expert(model, s.layer, s.expert, in_place=in_place)


def replay_grow(model: nn.Module, recipe: Mapping[str, Any]) -> nn.Module:
    """``model`` (edited in place) with the structure of a recorded ``grow`` step, to load weights into."""
    return apply_grow(model, GrowSettings(**recipe["step"]), in_place=True)
