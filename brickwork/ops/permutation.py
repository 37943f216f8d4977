"""Permutation specs of whole models, assembled from the bricks' declared symmetries, and applying them.

:func:`permutation_spec` walks a model's modules: each brick's :class:`~brickwork.nn.permutation.Symmetry`
is prefixed with the brick's path and the ports of its sub-bricks are unified with its own
permutations (union-find). The result is a plain :class:`PermutationSpec` (a user may write one
by hand for their own module). A permutation that reaches a module without a declared symmetry,
or the model's own input or output, is not applied (fixed), together with its parents.

Permutations are dicts name -> tensor: (n,) for a plain permutation, (P, n) for a nested one
(see :mod:`brickwork.nn.permutation` for the conventions).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from brickwork.errors import BrickworkError
from brickwork.nn.permutation import Axis, Perm, Probe, symmetry_of

Perms = dict[str, Tensor]


@dataclass(frozen=True)
class PermutationSpec:
    """Which axes of which tensors move together under each named permutation (plain data).

    Attributes:
        perms: name -> :class:`Perm` (nested permutations name their parent).
        axes: every permuted axis, tensors named by their state-dict keys.
        probes: where each permutation's units are observed on data (module paths).
    """

    perms: dict[str, Perm]
    axes: tuple[Axis, ...]
    probes: tuple[Probe, ...] = field(default=())

    def free(self) -> list[str]:
        """Names of the permutations that are not fixed."""
        return [n for n, p in self.perms.items() if not p.fixed]

    def flat_size(self, name: str) -> int:
        """Units a permutation spans on a parent-major axis (size x the parent's size when nested)."""
        p = self.perms[name]
        return p.size * (self.perms[p.parent].size if p.parent else 1)

    def check(self, model: nn.Module, where: str = "model") -> None:
        """Raise :class:`BrickworkError` if an axis names a missing tensor or does not fit its permutation."""
        state = model.state_dict()
        for name, p in self.perms.items():
            if p.parent is not None and (p.parent not in self.perms or self.perms[p.parent].parent is not None):
                raise BrickworkError(
                    f"permutation spec: {name!r} has parent {p.parent!r}, expected a top-level permutation"
                )
        for a in self.axes:
            if a.perm not in self.perms:
                raise BrickworkError(f"permutation spec: axis of {a.tensor!r} names unknown permutation {a.perm!r}")
            if a.tensor not in state:
                raise BrickworkError(f"permutation spec: {where} has no tensor {a.tensor!r} (axis of {a.perm!r})")
            t = state[a.tensor]
            if a.values:
                if t.dtype not in (torch.int64, torch.int32) or (t.numel() and int(t.max()) >= self.flat_size(a.perm)):
                    raise BrickworkError(f"permutation spec: {a.tensor!r} does not hold indices of {a.perm!r}")
                continue
            need = self.perms[a.perm].size if a.batch_dim is not None else self.flat_size(a.perm)
            if a.dim >= t.dim() or a.offset + need > t.shape[a.dim]:
                raise BrickworkError(
                    f"permutation spec: {where}.{a.tensor} {tuple(t.shape)} has no {need} units of {a.perm!r} "
                    f"on axis {a.dim} at offset {a.offset}"
                )


class _Builder:
    """Union-find over the permutations of every brick, with the ones to fix."""

    def __init__(self) -> None:
        self.perms: dict[str, Perm] = {}
        self.axes: list[Axis] = []
        self.probes: list[Probe] = []
        self.up: dict[str, str] = {}
        self.fixed: set[str] = set()

    def find(self, n: str) -> str:
        while self.up[n] != n:
            self.up[n] = self.up[self.up[n]]
            n = self.up[n]
        return n

    def flat(self, n: str) -> int:
        p = self.perms[n]
        return p.size * (self.perms[self.find(p.parent)].size if p.parent else 1)

    def fix(self, n: str) -> None:
        r = self.find(n)
        self.fixed.add(r)
        parent = self.perms[r].parent
        if parent is not None:
            self.fix(parent)

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        pa, pb = self.perms[ra], self.perms[rb]
        if pa.parent is not None and pb.parent is not None:
            self.up[rb] = ra  # two nested ports meeting: not representable, keep both fixed
            self.fix(ra)
            return
        if pb.parent is not None:  # the nested one stays the representative (its parent gives the layout)
            ra, rb, pa, pb = rb, ra, pb, pa
        fa, fb = self.flat(ra), self.flat(rb)
        if fa and fb and fa != fb:
            self.fix(ra)
            self.fix(rb)
            return
        if not fa and fb:
            self.perms[ra] = Perm(fb, pa.parent, pa.fixed)
        self.up[rb] = ra
        if rb in self.fixed or pb.fixed:
            self.fix(ra)

    def walk(self, module: nn.Module, path: str) -> dict[str, str]:
        """Register ``module``'s subtree; return its ports (local port name -> global permutation)."""
        sym = symmetry_of(module)
        named = _children(module)
        if sym is None:
            for name, child in named.items():
                for g in self.walk(child, _join(path, name)).values():
                    self.fix(g)
            return {}
        glob = {local: _join(path, local) for local in sym.perms}
        for local, p in sym.perms.items():
            g = glob[local]
            self.perms[g] = Perm(p.size, None if p.parent is None else glob[p.parent], p.fixed)
            self.up[g] = g
            if p.fixed:
                self.fixed.add(g)
        self.axes += [
            Axis(_join(path, a.tensor), a.dim, glob[a.perm], a.offset, a.batch_dim, a.values) for a in sym.axes
        ]
        self.probes += [Probe(_join(path, p.module), glob[p.perm], p.dim, p.input, p.offset) for p in sym.probes]
        for name, child in named.items():
            ports = self.walk(child, _join(path, name))
            binding = sym.children.get(name, {})
            for port, mine in binding.items():
                if port in ports:
                    self.union(glob[mine], ports[port])
                else:
                    self.fix(glob[mine])  # the child does not offer this port: it is not permutable there
            for port, g in ports.items():
                if port not in binding:
                    self.fix(g)
        out = {port: glob[port] for port in sym.ports}
        if sym.inputs is not None:
            out["in"] = glob[sym.inputs]
        if sym.output is not None:
            out["out"] = glob[sym.output]
        return out

    def spec(self) -> PermutationSpec:
        roots = {n: self.find(n) for n in self.perms}
        fixed = {roots[n] for n in self.fixed}
        keep: dict[str, Perm] = {}
        for n, p in self.perms.items():
            if roots[n] == n and p.size > 0 and not (n in fixed and p.parent is not None):
                keep[n] = Perm(p.size, None if p.parent is None else roots[p.parent], n in fixed)
        # a nested permutation whose parent was dropped cannot be applied
        keep = {n: p for n, p in keep.items() if p.parent is None or p.parent in keep}
        # a fixed parent without free children is dropped
        live = {p.parent for p in keep.values() if p.parent is not None and not p.fixed}
        keep = {n: p for n, p in keep.items() if not p.fixed or n in live}
        axes = tuple(
            Axis(a.tensor, a.dim, roots[a.perm], a.offset, a.batch_dim, a.values)
            for a in self.axes
            if roots[a.perm] in keep
        )
        probes = tuple(
            Probe(p.module, roots[p.perm], p.dim, p.input, p.offset) for p in self.probes if roots[p.perm] in keep
        )
        return PermutationSpec(keep, axes, probes)


def _children(module: nn.Module) -> dict[str, nn.Module]:
    """Named children, plain ``ModuleList``/``ModuleDict`` containers opened (``layers.0``, ``layers.1``, ...)."""
    out: dict[str, nn.Module] = {}
    for name, child in module.named_children():
        if type(child) in (nn.ModuleList, nn.ModuleDict):
            out |= {_join(name, k): v for k, v in _children(child).items()}
        else:
            out[name] = child
    return out


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path and name else path or name


def permutation_spec(model: nn.Module) -> PermutationSpec:
    """The permutation symmetries of ``model``, derived from its bricks' declarations.

    The model's own input and output are fixed (data features and classes). A module without a
    declared symmetry (and not a known ``torch.nn`` layer) is fixed: nothing of it is permuted,
    and a permutation reaching its input or output is dropped; symmetries inside its children
    that do not reach it (an FFN's hidden units) still count.

    Returns:
        A :class:`PermutationSpec` naming tensors by ``model.state_dict()`` keys.
    """
    b = _Builder()
    for g in b.walk(model, "").values():
        b.fix(g)
    return b.spec()


def identity(spec: PermutationSpec) -> Perms:
    """The identity for every permutation of ``spec``."""
    out: Perms = {}
    for n, p in spec.perms.items():
        if p.parent is None:
            out[n] = torch.arange(p.size)
        else:
            out[n] = torch.arange(p.size).repeat(spec.perms[p.parent].size, 1)
    return out


def random_perms(spec: PermutationSpec, generator: torch.Generator | None = None) -> Perms:
    """Uniformly random permutations (fixed ones stay the identity), e.g. to plant in a test."""
    out = identity(spec)
    for n, p in spec.perms.items():
        if p.fixed:
            continue
        if p.parent is None:
            out[n] = torch.randperm(p.size, generator=generator)
        else:
            out[n] = torch.stack([torch.randperm(p.size, generator=generator) for _ in range(len(out[n]))])
    return out


def flat_perm(spec: PermutationSpec, perms: Perms, name: str) -> Tensor:
    """(flat_size,) the composed permutation of a parent-major axis: ``parent[i] * n + child[i, j]``."""
    p = spec.perms[name]
    if p.parent is None:
        return perms[name]
    parent = perms[p.parent]
    return (parent[:, None] * p.size + perms[name]).reshape(-1)


def invert(spec: PermutationSpec, perms: Perms) -> Perms:
    """The permutations that undo ``perms`` (applying both, in either order, is the identity)."""
    out: Perms = {}
    for n, p in spec.perms.items():
        if p.parent is None:
            out[n] = torch.argsort(perms[n])
    for n, p in spec.perms.items():
        if p.parent is not None:
            # position a of the original holds, after ``perms``, parent position inv_parent[a]
            out[n] = torch.argsort(perms[n][out[p.parent]], dim=1)
    return out


def permute_tensor(
    spec: PermutationSpec, perms: Perms, t: Tensor, axes: list[Axis], skip: set[str] | None = None
) -> Tensor:
    """``t`` with ``axes`` (all of this tensor's) moved by ``perms``; permutations in ``skip`` left as they are."""
    skip = skip or set()
    for a in sorted(axes, key=lambda a: a.batch_dim is not None):
        if a.perm in skip:
            continue
        p = spec.perms[a.perm]
        if a.values:
            inv = torch.argsort(flat_perm(spec, perms, a.perm)).to(t.device)
            t = inv[t.long()].to(t.dtype)
        elif a.batch_dim is None:
            idx = flat_perm(spec, perms, a.perm).to(t.device)
            part = t.narrow(a.dim, a.offset, len(idx)).index_select(a.dim, idx)
            t = torch.cat(
                [
                    t.narrow(a.dim, 0, a.offset),
                    part,
                    t.narrow(a.dim, a.offset + len(idx), t.shape[a.dim] - a.offset - len(idx)),
                ],
                a.dim,
            )
        else:
            child = perms[a.perm].to(t.device)  # (P, n), rows for the parent's new positions
            part = t.narrow(a.dim, a.offset, p.size)
            shape = [1] * t.dim()
            shape[a.batch_dim], shape[a.dim] = child.shape[0], p.size
            index = child.reshape(shape) if a.batch_dim < a.dim else child.t().reshape(shape)
            part = part.gather(a.dim, index.expand_as(part))
            t = torch.cat(
                [
                    t.narrow(a.dim, 0, a.offset),
                    part,
                    t.narrow(a.dim, a.offset + p.size, t.shape[a.dim] - a.offset - p.size),
                ],
                a.dim,
            )
    return t


def axes_by_tensor(spec: PermutationSpec) -> dict[str, list[Axis]]:
    """The spec's axes grouped by tensor name."""
    out: dict[str, list[Axis]] = {}
    for a in spec.axes:
        out.setdefault(a.tensor, []).append(a)
    return out


@torch.no_grad()
def permute(model: nn.Module, perms: Perms, spec: PermutationSpec | None = None) -> nn.Module:
    """A copy of ``model`` with its units permuted by ``perms`` (the original is not modified).

    Args:
        model: any module; ``spec`` defaults to :func:`permutation_spec` of it.
        perms: name -> (n,) or (P, n) permutation; names missing are the identity.
        spec: the permutation spec (give one for a module without declared symmetries).

    Returns:
        The permuted copy; for a spec derived from the bricks it computes the same function.
    """
    spec = permutation_spec(model) if spec is None else spec
    spec.check(model)
    full = identity(spec) | {k: v for k, v in perms.items() if k in spec.perms}
    unknown = sorted(set(perms) - set(spec.perms))
    if unknown:
        raise BrickworkError(f"permute: unknown permutations {unknown[:5]}; expected names of the spec")
    out = copy.deepcopy(model)
    tensors = dict(out.named_parameters()) | dict(out.named_buffers())
    for name, axes in axes_by_tensor(spec).items():
        t = tensors[name]
        t.copy_(permute_tensor(spec, full, t.detach(), axes))
    return out
