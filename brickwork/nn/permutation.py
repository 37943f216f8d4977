"""Permutation symmetries that bricks declare, for alignment (git re-basin) without hand-written specs.

A brick with a permutation symmetry defines ``permutation_symmetry() -> Symmetry``: named
permutations (:class:`Perm`), the axes of its tensors each one moves (:class:`Axis`), where
its units can be observed on data (:class:`Probe`), which permutation is its input and its
output, and how the ports of its sub-bricks bind to its own permutations. ``ops`` assembles a
whole model's spec from these declarations (:func:`brickwork.ops.permutation_spec`), so a new
brick joins the aligner without the aligner learning about it.

Conventions:

* A permutation ``p`` of ``size`` units is a (size,) index tensor; applying it puts the old
  unit ``p[i]`` at position ``i``.
* A nested permutation (``parent`` set) is one permutation of ``size`` units inside each unit of
  the parent (a head's neurons, an expert's hidden units, a group's units): a (P, size) tensor,
  row ``i`` for the parent's *new* position ``i``. On an axis without ``batch_dim`` the units
  are laid out parent-major (unit (i, j) at ``i * size + j``), so the whole axis moves by the
  composed permutation ``parent[i] * size + child[i, j]``: heads and groups move as whole units.
  With ``batch_dim`` another axis of the tensor holds the parent's units (an expert bank's
  (E, D, H) weights).
* A brick without a declared symmetry is fixed: none of its axes is permuted, and a permutation
  that would reach its inputs or outputs is not applied anywhere (it stays the identity).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from torch import nn


@dataclass(frozen=True)
class Perm:
    """A named permutation of ``size`` units (0: the size is taken from what it is bound to).

    Attributes:
        size: number of units (per parent unit when nested).
        parent: name of the enclosing permutation (heads of attention, experts, groups), or None.
        fixed: never permuted (the identity); kept only to give its nested permutations a shape.
    """

    size: int
    parent: str | None = None
    fixed: bool = False


@dataclass(frozen=True)
class Axis:
    """One axis of one tensor that a permutation moves.

    Attributes:
        tensor: parameter or buffer name (relative to the declaring brick; full in a model spec).
        dim: the axis.
        perm: name of the permutation.
        offset: index where the permutation's units start on the axis (fused q/k/v projections).
        batch_dim: for a nested permutation, the axis holding the parent's units (None: parent-major
            layout on ``dim``).
        values: the tensor holds unit indices of the permutation, remapped rather than moved
            (a :class:`~brickwork.nn.sparse.GroupLinear`'s ``in_perm``).
    """

    tensor: str
    dim: int
    perm: str
    offset: int = 0
    batch_dim: int | None = None
    values: bool = False


@dataclass(frozen=True)
class Probe:
    """Where the units of a permutation can be observed: a module's output (or first input).

    Attributes:
        module: module path ("" for the declaring brick itself).
        perm: name of the permutation.
        dim: axis of the activation holding the units (-1 for (..., D), 1 for (B, C, H, W)).
        input: observe the module's first input instead of its output.
        offset: index where the units start on ``dim``.
    """

    module: str
    perm: str
    dim: int = -1
    input: bool = False
    offset: int = 0


@dataclass
class Symmetry:
    """What one brick declares.

    Attributes:
        perms: the brick's permutations by local name.
        axes: axes of the brick's own tensors (names relative to the brick).
        probes: where units are observed (activation matching; a permutation without one is
            matched by weights).
        inputs: the permutation of the input features, or None (not permutable).
        output: the permutation of the output features, or None.
        ports: further permutations valid only where the enclosing brick binds them (an expert
            bank's expert order, which the router must follow).
        children: sub-module name -> {the child's port ("in", "out" or one of its ``ports``): this
            brick's permutation}. A bound port the child does not offer makes the permutation fixed.
    """

    perms: dict[str, Perm] = field(default_factory=dict)
    axes: list[Axis] = field(default_factory=list)
    probes: list[Probe] = field(default_factory=list)
    inputs: str | None = None
    output: str | None = None
    ports: tuple[str, ...] = ()
    children: dict[str, dict[str, str]] = field(default_factory=dict)


@runtime_checkable
class PermutationSymmetric(Protocol):
    """A module that declares its permutation symmetry."""

    def permutation_symmetry(self) -> Symmetry: ...


def chain_symmetry(names: list[str]) -> Symmetry:
    """Sub-modules applied in sequence: the output permutation of each is the input of the next."""
    perms = {f"p{i}": Perm(0) for i in range(len(names) + 1)}
    children = {n: {"in": f"p{i}", "out": f"p{i + 1}"} for i, n in enumerate(names)}
    return Symmetry(perms=perms, inputs="p0", output=f"p{len(names)}", children=children)


def passthrough_symmetry() -> Symmetry:
    """An elementwise module (activation, dropout, identity): its output permutation is its input's."""
    return Symmetry(perms={"x": Perm(0)}, inputs="x", output="x")


_ELEMENTWISE = (
    nn.Identity,
    nn.Dropout,
    nn.ReLU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.LeakyReLU,
    nn.ELU,
    nn.Softplus,
)


def symmetry_of(module: nn.Module) -> Symmetry | None:
    """The module's declared symmetry, that of a known ``torch.nn`` layer, or None (fixed).

    Known layers: ``Linear``, ``Conv2d`` (ungrouped), ``LayerNorm`` (1-d), ``BatchNorm1d/2d``,
    ``GroupNorm`` with one group, ``Sequential`` (a chain), and elementwise modules.
    """
    if isinstance(module, PermutationSymmetric):
        return module.permutation_symmetry()
    if isinstance(module, nn.Linear):
        axes = [Axis("weight", 0, "out"), Axis("weight", 1, "in")]
        axes += [Axis("bias", 0, "out")] if module.bias is not None else []
        perms = {"in": Perm(module.in_features), "out": Perm(module.out_features)}
        return Symmetry(perms, axes, [Probe("", "out", -1)], inputs="in", output="out")
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        axes = [Axis("weight", 0, "out"), Axis("weight", 1, "in")]
        axes += [Axis("bias", 0, "out")] if module.bias is not None else []
        perms = {"in": Perm(module.in_channels), "out": Perm(module.out_channels)}
        return Symmetry(perms, axes, [Probe("", "out", 1)], inputs="in", output="out")
    per_channel: list[str] = []
    size = 0
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        size, per_channel = module.normalized_shape[0], ["weight", "bias"]
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        size, per_channel = module.num_features, ["weight", "bias", "running_mean", "running_var"]
    elif isinstance(module, nn.GroupNorm) and module.num_groups == 1:
        size, per_channel = module.num_channels, ["weight", "bias"]
    if size:
        present = [n for n in per_channel if getattr(module, n, None) is not None]
        return Symmetry({"x": Perm(size)}, [Axis(n, 0, "x") for n in present], inputs="x", output="x")
    if isinstance(module, nn.Sequential):
        return chain_symmetry([n for n, _ in module.named_children()])
    if isinstance(module, _ELEMENTWISE):
        return passthrough_symmetry()
    return None
