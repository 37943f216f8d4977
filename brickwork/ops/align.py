"""Permutation alignment of two same-architecture models: weight matching, activation matching, REPAIR.

* Weight matching (Ainsworth et al., "Git Re-Basin", ICLR 2023, Algorithm 1): coordinate descent
  over permutations in random order; each step solves one linear assignment
  (``scipy.optimize.linear_sum_assignment``, maximising sum_i <A_i, B_perm(i)> over every axis the
  permutation moves, the other permutations held at their current value), until a full pass
  changes nothing (at most ``max_iter`` passes).
* Activation matching (same paper, Sec. 3.1): one assignment per permutation, maximising the
  summed Pearson correlation of the units' activations on data. A permutation without a probe
  (expert order and experts' hidden units: their activations exist only on routed tokens) is
  matched by weights, the activation-matched ones held fixed.
* Nested permutations (attention heads with their q/k and v/o neurons; experts with their hidden
  units; groups with their units) are solved as one unit: the score of pairing parent unit i
  with parent unit k is the best within-unit assignment of each nested permutation, then one
  assignment over the parents. So heads move as whole heads (git re-basin issue #6).
* :func:`repair`: REPAIR (Jordan et al., "REPAIR: REnormalizing Permuted Activations for
  Interpolation Repair", ICLR 2023): after interpolating, each chosen layer's output units get the
  interpolation of the endpoints' per-unit mean and std on data (folded into its weight and bias),
  layer after layer in forward order; BatchNorm running statistics are re-estimated on the data
  (the "reset BN statistics" variant, which is what REPAIR reduces to for BatchNorm networks;
  :func:`brickwork.analysis.reset_batch_norm`, the one home of that reset).

The linear path between two models (:func:`brickwork.analysis.interpolate`) lives in
``analysis/connectivity.py``.

Every function **copies**: the models passed in are not modified.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from brickwork.analysis.connectivity import check_same_architecture, reset_batch_norm
from brickwork.errors import BrickworkError
from brickwork.nn.modes import evaluating
from brickwork.nn.permutation import Axis
from brickwork.ops.permutation import (
    Perms,
    PermutationSpec,
    axes_by_tensor,
    identity,
    permutation_spec,
    permute,
    permute_tensor,
)

Method = Literal["weight", "activation"]


def _families(spec: PermutationSpec) -> dict[str, list[str]]:
    """Top-level permutation -> its nested permutations."""
    fam: dict[str, list[str]] = {n: [] for n, p in spec.perms.items() if p.parent is None}
    for n, p in spec.perms.items():
        if p.parent is not None:
            fam[p.parent].append(n)
    return fam


def _lap(score: np.ndarray) -> tuple[np.ndarray, float]:
    from scipy.optimize import linear_sum_assignment  # here: scipy is slow to import

    rows, cols = linear_sum_assignment(score, maximize=True)
    return cols[np.argsort(rows)], float(score[rows, cols].sum())


def _solve(
    root: Tensor | None, children: dict[str, Tensor], size: int, fixed: bool
) -> tuple[np.ndarray, dict[str, np.ndarray], float]:
    """Best (parent, nested) assignment from similarity tensors.

    Args:
        root: (P, P) similarity of parent units (i of the reference, k of the other), or None.
        children: name -> (P, P, n, n) similarity of nested unit a of parent i and b of parent k.
        size: P.
        fixed: the parent stays the identity.

    Returns:
        parent perm (P,), nested perms name -> (P, n), the objective.
    """
    value = np.zeros((size, size)) if root is None else root.double().numpy().copy()
    best: dict[str, dict[tuple[int, int], np.ndarray]] = {c: {} for c in children}
    pairs = [] if not children else [(i, i) for i in range(size)] if fixed else list(np.ndindex(size, size))
    for c, s in children.items():
        s64 = s.double().numpy()
        for i, k in pairs:
            cols, v = _lap(s64[i, k])
            best[c][(i, k)] = cols
            value[i, k] += v
    if fixed:
        parent = np.arange(size)
        total = float(np.trace(value))
    else:
        parent, total = _lap(value)
    nested = {c: np.stack([best[c][(i, int(parent[i]))] for i in range(size)]) for c in children}
    return parent, nested, total


def _units(t: Tensor, dim: int, offset: int, count: int) -> Tensor:
    """(count, rest) the units of ``t`` on ``dim`` from ``offset``, everything else flattened."""
    return t.narrow(dim, offset, count).movedim(dim, 0).reshape(count, -1).double()


class _Similarities:
    """The similarity terms of weight matching, one per (tensor, axis), cached while their inputs stand.

    A family's score is the sum over every tensor axis it moves of ``<A units, B units>``, B's
    *other* permutations applied. A term depends only on the versions of those other permutations
    (for an MLP's hidden layer l: layer l's weight on its input permutation, layer l+1's on its
    output one), so after the first pass most terms are reused, not recomputed: a step costs its
    assignment, plus one product for each neighbour that moved (git re-basin recomputes every
    product at every step). Terms are computed and summed exactly as without the cache (same
    operands, same order), so the permutations found are identical.
    """

    def __init__(self, spec: PermutationSpec, a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
        self.spec = spec
        self.by_tensor = axes_by_tensor(spec)
        self.a, self.b = a, b
        self.version = dict.fromkeys(spec.perms, 0)  # bumped whenever a permutation is assigned
        self.cache: dict[tuple[str, int], tuple[tuple[int, ...], Tensor]] = {}
        self.units_a: dict[tuple[str, int], Tensor] = {}

    def assigned(self, name: str) -> None:
        self.version[name] += 1

    def depends(self, family: list[str]) -> tuple[int, ...]:
        """The versions of every permutation (not in ``family``) that ``family``'s terms read."""
        skip = set(family)
        touched = [t for t, axes in self.by_tensor.items() if any(ax.perm in skip and not ax.values for ax in axes)]
        return tuple(v for t in touched for v in self._reads(t, skip))

    def _reads(self, tensor: str, skip: set[str]) -> tuple[int, ...]:
        """Versions of the permutations applied to ``b[tensor]`` when ``skip`` is left as it is."""
        out: list[int] = []
        for ax in self.by_tensor[tensor]:
            if ax.perm not in skip:
                parent = self.spec.perms[ax.perm].parent
                out += [self.version[ax.perm]] + ([] if parent is None else [self.version[parent]])
        return tuple(out)

    def family(self, perms: Perms, family: list[str]) -> tuple[Tensor | None, dict[str, Tensor]]:
        """Similarities of one family's units between ``a`` and ``b`` (b's other permutations applied)."""
        spec = self.spec
        root_name = family[0]
        p_size = spec.perms[root_name].size
        root: Tensor | None = None
        kids: dict[str, Tensor] = {}
        skip = set(family)
        for name, axes in self.by_tensor.items():
            mine = [(i, ax) for i, ax in enumerate(axes) if ax.perm in skip and not ax.values]
            # A tensor whose parent axis also holds nested units (an expert's weights: experts on
            # dim 0, their hidden units on dim 1 batched by dim 0) is scored by the nested term
            # alone: that term is already the whole <A_i, B_k> under the best within-unit
            # assignment, and adding the parent term as well would count the tensor a second
            # time with the nested units unaligned (biasing the parent choice to the identity).
            batched = {ax.batch_dim for _, ax in mine if ax.perm != root_name and ax.batch_dim is not None}
            mine = [(i, ax) for i, ax in mine if not (ax.perm == root_name and ax.dim in batched)]
            if not mine:
                continue
            key = self._reads(name, skip)
            tb: Tensor | None = None
            for i, ax in mine:
                hit = self.cache.get((name, i))
                if hit is not None and hit[0] == key:
                    s = hit[1]
                else:
                    if tb is None:
                        tb = permute_tensor(spec, perms, self.b[name], axes, skip)
                    s = self._term(name, i, tb, root_name, p_size)
                    self.cache[(name, i)] = (key, s)
                if ax.perm == root_name:
                    root = s if root is None else root + s
                else:
                    kids[ax.perm] = s if ax.perm not in kids else kids[ax.perm] + s
        for c in family[1:]:
            kids.setdefault(c, torch.zeros(p_size, p_size, spec.perms[c].size, spec.perms[c].size, dtype=torch.float64))
        return root, kids

    def _mine(self, name: str, i: int, make: Callable[[], Tensor]) -> Tensor:
        """The reference's units of axis ``i`` of tensor ``name`` (float64), made once: A never moves."""
        if (name, i) not in self.units_a:
            self.units_a[(name, i)] = make()
        return self.units_a[(name, i)]

    def _term(self, name: str, i: int, tb: Tensor, root_name: str, p_size: int) -> Tensor:
        """(P, P) for the family's root, (P, P, n, n) for a nested permutation: axis ``i`` of ``name``."""
        ta, ax = self.a[name], self.by_tensor[name][i]
        p = self.spec.perms[ax.perm]
        if ax.perm == root_name:
            return (
                self._mine(name, i, lambda: _units(ta, ax.dim, ax.offset, p_size))
                @ _units(tb, ax.dim, ax.offset, p_size).T
            )
        if ax.batch_dim is None:
            ua = self._mine(name, i, lambda: _units(ta, ax.dim, ax.offset, p_size * p.size).reshape(p_size, p.size, -1))
            ub = _units(tb, ax.dim, ax.offset, p_size * p.size).reshape(p_size, p.size, -1)
        else:

            def nested(t: Tensor, ax: Axis = ax, n: int = p.size) -> Tensor:
                assert ax.batch_dim is not None
                t = t.narrow(ax.dim, ax.offset, n).movedim((ax.batch_dim, ax.dim), (0, 1))
                return t.reshape(p_size, n, -1).double()

            ua, ub = self._mine(name, i, lambda: nested(ta)), nested(tb)
        return torch.einsum("iaf,kbf->ikab", ua, ub)


def weight_matching(
    reference: nn.Module,
    other: nn.Module,
    spec: PermutationSpec | None = None,
    *,
    max_iter: int = 100,
    seed: int = 0,
    hold: Perms | None = None,
) -> Perms:
    """Permutations of ``other`` that best match ``reference`` by weights (git re-basin coordinate descent).

    A step whose scores are unchanged since its family was last solved (no permutation it reads
    has moved) is skipped: its assignment would be the same, so it changes nothing. With the
    cached products (:class:`_Similarities`) a pass after the first costs little more than the
    assignments of the families whose neighbours moved; the result is that of the plain descent.

    Args:
        reference: model A; other: model B of the same architecture.
        spec: the permutation spec (default: derived from ``reference``'s bricks).
        max_iter: most passes over all permutations.
        seed: order of the permutations in each pass.
        hold: permutations already decided (kept, not optimised).

    Returns:
        name -> (n,) or (P, n): apply to ``other`` with :func:`brickwork.ops.permute`.
    """
    check_same_architecture(reference, other, "align", equal_integers=False)
    spec = permutation_spec(reference) if spec is None else spec
    spec.check(reference, "reference")
    a = {k: v.detach().cpu() for k, v in reference.state_dict().items()}
    b = {k: v.detach().cpu() for k, v in other.state_dict().items()}
    perms = identity(spec) | dict(hold or {})
    fams = {r: [r, *kids] for r, kids in _families(spec).items() if r not in (hold or {})}
    rng = np.random.default_rng(seed)
    names = sorted(fams)
    sims = _Similarities(spec, a, b)
    solved: dict[str, tuple[int, ...]] = {}  # family -> the versions its last solve read
    for _ in range(max_iter):
        changed = False
        for r in [names[i] for i in rng.permutation(len(names))]:
            fam = fams[r]
            reads = sims.depends(fam)
            if solved.get(r) == reads:
                continue  # the same scores as at its last solve: the same assignment, no change
            solved[r] = reads
            root, kids = sims.family(perms, fam)
            parent, nested, new = _solve(root, kids, spec.perms[r].size, spec.perms[r].fixed)
            old = _objective(root, kids, perms, fam)
            if new > old + 1e-12 * max(1.0, abs(old)):
                perms[r] = torch.from_numpy(parent).long()
                for c in fam[1:]:
                    perms[c] = torch.from_numpy(nested[c]).long()
                for n in fam:
                    sims.assigned(n)
                changed = True
        if not changed:
            break
    return perms


def _objective(root: Tensor | None, kids: dict[str, Tensor], perms: Perms, fam: list[str]) -> float:
    parent = perms[fam[0]]
    rows = torch.arange(len(parent))
    total = 0.0 if root is None else float(root[rows, parent].sum())
    for c in fam[1:]:
        s = kids[c][rows, parent]  # (P, n, n)
        n = s.shape[1]
        total += float(s[rows[:, None], torch.arange(n)[None, :], perms[c]].sum())
    return total


@torch.no_grad()
def _activations(model: nn.Module, spec: PermutationSpec, batches: Sequence[Tensor], max_rows: int) -> list[Tensor]:
    """Per probe, (N, flat units) activations over ``batches``."""
    store: list[list[Tensor]] = [[] for _ in spec.probes]
    handles = []
    for i, pr in enumerate(spec.probes):
        count = spec.flat_size(pr.perm)

        def hook(
            _m: nn.Module, args: tuple[Tensor, ...], out: Tensor, i: int = i, pr: object = pr, count: int = count
        ) -> None:
            x = args[0] if pr.input else out  # type: ignore[attr-defined]
            x = x.narrow(pr.dim, pr.offset, count).movedim(pr.dim, -1).reshape(-1, count)  # type: ignore[attr-defined]
            store[i].append(x.double().cpu())

        handles.append(model.get_submodule(pr.module).register_forward_hook(hook))
    try:
        with evaluating(model):
            for x in batches:
                model(x)
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(s)[:max_rows] for s in store]


def _standardise(x: Tensor) -> Tensor:
    """(units, N) z-scored rows divided by sqrt(N): row dot products are correlations."""
    x = x.T
    x = x - x.mean(1, keepdim=True)
    return x / (x.norm(dim=1, keepdim=True) + 1e-12)


def activation_matching(
    reference: nn.Module,
    other: nn.Module,
    batches: Iterable[Tensor],
    spec: PermutationSpec | None = None,
    *,
    max_rows: int = 8192,
    seed: int = 0,
) -> Perms:
    """Permutations of ``other`` maximising the correlation of activations with ``reference`` on ``batches``.

    Each permutation with probes gets one assignment (the summed correlation over its probes,
    e.g. every block's output for a residual stream). Families with a permutation that has no
    probe (experts) are then matched by weights (:func:`weight_matching`) with these held.

    Args:
        reference, other: same-architecture models; batches: inputs (B, ...) for both.
        spec: default derived from ``reference``; max_rows: activation rows kept per probe.
    """
    check_same_architecture(reference, other, "align", equal_integers=False)
    spec = permutation_spec(reference) if spec is None else spec
    spec.check(reference, "reference")
    data = list(batches)
    if not data:
        raise BrickworkError("align: activation matching needs data batches (got none)")
    acts_a = _activations(reference, spec, data, max_rows)
    acts_b = _activations(other, spec, data, max_rows)
    probed = {pr.perm for pr in spec.probes}
    perms = identity(spec)
    held: Perms = {}
    for r, kids in _families(spec).items():
        leaves = kids or [r]
        if not all(leaf in probed for leaf in leaves):
            continue
        size = spec.perms[r].size
        root: Tensor | None = None
        sims: dict[str, Tensor] = {}
        for pr, xa, xb in zip(spec.probes, acts_a, acts_b, strict=True):
            if pr.perm == r:
                s = _standardise(xa) @ _standardise(xb).T
                root = s if root is None else root + s
            elif pr.perm in kids:
                n = spec.perms[pr.perm].size
                ua, ub = _standardise(xa).reshape(size, n, -1), _standardise(xb).reshape(size, n, -1)
                s = torch.einsum("iaf,kbf->ikab", ua, ub)
                sims[pr.perm] = s if pr.perm not in sims else sims[pr.perm] + s
        parent, nested, _ = _solve(root, sims, size, spec.perms[r].fixed)
        held[r] = torch.from_numpy(parent).long()
        held |= {c: torch.from_numpy(v).long() for c, v in nested.items()}
    if len(held) < len(perms):
        return weight_matching(reference, other, spec, seed=seed, hold=held)
    return perms | held


def align(
    reference: nn.Module,
    other: nn.Module,
    *,
    method: Method = "weight",
    batches: Iterable[Tensor] | None = None,
    spec: PermutationSpec | None = None,
    seed: int = 0,
) -> tuple[nn.Module, Perms]:
    """A copy of ``other`` with its units permuted to match ``reference``; the function is unchanged.

    Args:
        reference: model A; other: model B of the same architecture (neither is modified).
        method: ``"weight"`` (:func:`weight_matching`) or ``"activation"`` (:func:`activation_matching`,
            needs ``batches``).
        batches: input batches (B, ...) for activation matching.
        spec: a :class:`PermutationSpec` (default: derived from the bricks; give one for a module
            without declared symmetries).
        seed: order of the coordinate descent.

    Returns:
        (aligned copy of ``other``, the permutations applied to it).
    """
    spec = permutation_spec(reference) if spec is None else spec
    if method == "weight":
        perms = weight_matching(reference, other, spec, seed=seed)
    elif method == "activation":
        if batches is None:
            raise BrickworkError("align: method 'activation' needs batches (inputs to run both models on)")
        perms = activation_matching(reference, other, batches, spec, seed=seed)
    else:
        raise BrickworkError(f"align: unknown method {method!r}; expected 'weight' or 'activation'")
    return permute(other, perms, spec), perms


def _default_targets(model: nn.Module) -> list[str]:
    """``nn.Linear`` / ``nn.Conv2d`` whose parent has no BatchNorm (those are reset through their BN)."""
    out = []
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        has_bn = any(isinstance(c, nn.modules.batchnorm._BatchNorm) for c in parent.children())
        if m.bias is not None and not has_bn:
            out.append(name)
    return out


@torch.no_grad()
def _unit_stats(model: nn.Module, path: str, batches: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Per output unit mean and std of module ``path`` over ``batches`` (units on dim 1 for convs, else last)."""
    m = model.get_submodule(path)
    rows: list[Tensor] = []

    def hook(_m: nn.Module, _a: tuple[Tensor, ...], y: Tensor) -> None:
        d = 1 if isinstance(m, nn.Conv2d) else -1
        rows.append(y.movedim(d, -1).reshape(-1, y.shape[d]).double())

    h = m.register_forward_hook(hook)
    try:
        with evaluating(model):
            for x in batches:
                model(x)
    finally:
        h.remove()
    z = torch.cat(rows)
    return z.mean(0), z.std(0, unbiased=False)


@torch.no_grad()
def repair(
    merged: nn.Module,
    reference: nn.Module,
    other: nn.Module,
    batches: Iterable[Tensor],
    *,
    t: float = 0.5,
    targets: Sequence[str] | None = None,
) -> nn.Module:
    """REPAIR: a copy of ``merged`` whose units have the interpolated endpoint statistics on ``batches``.

    For each target layer (forward order), with endpoint per-unit statistics (mu_a, s_a), (mu_b, s_b)
    and the merged model's (mu_m, s_m) after the earlier corrections, the target is
    ``mu = (1-t) mu_a + t mu_b``, ``s = (1-t) s_a + t s_b`` and the layer becomes
    ``W' = (s / s_m) W``, ``b' = (s / s_m)(b - mu_m) + mu`` (Jordan et al., 2023, Sec. 4.2, folded).
    BatchNorm running statistics are then re-estimated (the simplified "reset BN statistics" variant).

    Args:
        merged: the interpolated model (e.g. :func:`brickwork.analysis.interpolate` of ``reference``
            and an aligned ``other``).
        reference, other: the endpoints (``other`` already aligned).
        batches: inputs (B, ...); t: the interpolation weight of ``other``.
        targets: module paths of ``nn.Linear`` / ``nn.Conv2d`` layers (default: all whose parent
            has no BatchNorm).
    """
    data = list(batches)
    if not data:
        raise BrickworkError("repair: needs data batches (got none)")
    out = reset_batch_norm(copy.deepcopy(merged), data)
    names = _default_targets(out) if targets is None else list(targets)
    for path in names:
        layer = out.get_submodule(path)
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            raise BrickworkError(f"repair: {path!r} is {type(layer).__name__}, expected nn.Linear or nn.Conv2d")
        if layer.bias is None:
            raise BrickworkError(f"repair: {path!r} has no bias to fold the correction into (choose other targets)")
        mu_a, s_a = _unit_stats(reference, path, data)
        mu_b, s_b = _unit_stats(other, path, data)
        mu_m, s_m = _unit_stats(out, path, data)
        mu, s = (1 - t) * mu_a + t * mu_b, (1 - t) * s_a + t * s_b
        scale = s / (s_m + 1e-8)
        w = layer.weight
        w.mul_(scale.to(w.dtype).view(-1, *[1] * (w.dim() - 1)))
        layer.bias.copy_((scale * (layer.bias.double() - mu_m) + mu).to(w.dtype))
    return reset_batch_norm(out, data)
