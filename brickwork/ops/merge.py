"""Merging same-architecture models: linear, task arithmetic, TIES, DARE, SLERP, Model Stock, Fisher, RegMean.

One engine serves models in memory and safetensors files (:mod:`brickwork.ops.merge_files`): it
reads every tensor through a :class:`Source` in row chunks of at most ``chunk_elems`` elements
and computes in float64, casting the result back to the inputs' dtype. Two consequences, both
tested: N copies of one float32 model merge back to it *exactly* (the float64 rounding is far
below float32's), and the streaming and in-memory merges give identical tensors (same chunks,
same arithmetic). Every method is elementwise or a linear combination whose coefficients come
from per-tensor inner products, so memory beyond the output is a few chunks per model.

Methods (``method=``), with the semantics implemented where the anchors differ:

* ``linear``: sum_i w_i theta_i / sum_i w_i (weights default to equal).
* ``task_arithmetic`` (Ilharco et al., 2023): base + scale * sum_i w_i (theta_i - base); weights
  default to 1 (the paper's sum of task vectors); ``normalize=True`` divides by sum_i w_i.
* ``ties`` (Yadav et al., 2023): each task vector trimmed to its ``density`` largest magnitudes
  (per tensor, the k = int(density * numel) largest; values tied at the threshold are all
  kept), a sign elected per element, a disjoint mean over the agreeing vectors, then
  base + scale * mean. ``ties="peft"`` (default, the paper's and PEFT's ``total`` method):
  the sign of the sum of the *unweighted* trimmed vectors, and sum_agree w_i tau_i divided by
  the *number* of agreeing vectors. ``ties="mergekit"``: the sign of the *weighted* sum,
  divided by the agreeing *weight mass* (mergekit's ``normalize=True``). For
  tau = [[1, -2, .5], [-.5, 1, .5]], w = [.9, .1]: peft [0.9, -1.8, 0.25], mergekit [1, -2, .5].
* ``dare_linear`` / ``dare_ties`` (Yu et al., 2024): every task-vector element kept with
  probability ``density`` and rescaled by 1 / density (unbiased), then task arithmetic or
  TIES's sign election and disjoint mean (no magnitude trim, as mergekit's ``dare_ties``).
  Masks are seeded per (seed, tensor, input position, chunk): reordering the inputs redraws
  them (same distribution), so DARE is order-invariant in distribution only.
* ``slerp`` (two models, ``t``): the flattened tensors' great-circle interpolation,
  sin((1-t)Omega)/sin(Omega) a + sin(t Omega)/sin(Omega) b as mergekit; linear where
  |cos Omega| > 0.9995 or a tensor is zero. ``multislerp`` (N models, weights): the weighted
  mean of the unit directions in the tangent space at their normalised weighted mean, mapped
  back (one tangent step: exact for two models, where it has slerp's direction) and scaled to
  the weighted mean norm; linear when all directions are near-parallel.
* ``model_stock`` (Jang et al., 2024): base + t (mean_i theta_i - base) with
  t = N cos / (1 + (N - 1) cos), cos the mean pairwise cosine of the task vectors per tensor
  (as mergekit: the paper does not say how to average the angles), clamped to [0, 1].
* ``fisher`` (Matena & Raffel, 2022): sum_i w_i F_i theta_i / sum_i w_i F_i elementwise, F_i the
  diagonal Fisher plus ``eps`` (their ``fisher_floor``); tensors without a Fisher (buffers):
  linear. :func:`fisher_diagonal` estimates F on data.
* ``regmean`` (Jin et al., 2023): for each linear weight W_i (out, in) with Gram G_i = X_i^T X_i
  of its inputs (:func:`gram_matrices`), W = (sum_i w_i W_i G~_i)(sum_i w_i G~_i)^-1 with
  G~_i = alpha G_i + (1 - alpha) diag(G_i) + ridge m I, m the w-weighted mean of the Grams'
  diagonal entries (alpha = 1, ridge = 0: exact least squares on the concatenated inputs; the
  paper reduces the non-diagonal part, alpha < 1, for robustness); other tensors: linear.
  The ridge is ours (the paper assumes invertible Grams): an input that is always 0 (MNIST's
  border pixels) or a ReLU unit that never fires gives every G_i a zero row and column, which
  alpha < 1 does not fix (its diagonal entry is 0 too). It is added to each G_i, on both sides
  of the formula, so the invariances stay (N copies merge to the copy, equal Grams give the
  weighted average), and with alpha = 1 the result is the exact minimiser of
  sum_i w_i (||X_i W^T - X_i W_i^T||^2 + ridge m ||W - W_i||^2): directions no model's data
  reaches take the weighted average of the W_i, as ``linear`` would (a pseudo-inverse would set
  them to 0 instead, and N copies would not merge back). Default 1e-6: relative to m, so it does
  not depend on the number or scale of the inputs; a direction with Gram eigenvalue e moves by
  at most a relative ~1e-6 m / e toward that average (1e-5 for e = 0.1 m), and the float64 solve stays
  well conditioned (condition number <= about 1e6 times the largest eigenvalue over m).
  ``ridge=0`` is the unregularised solve, refused for a singular Gram.

Options apply to every tensor; ``overrides`` (module-path glob -> options, applied in order,
later patterns winning) changes them per parameter or module, the method included. Integer
and bool tensors (a batch norm's ``num_batches_tracked``) take the elementwise maximum.

The ops **copy**: inputs are never modified.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import math
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, get_args

import torch
from torch import Tensor, nn

from brickwork.errors import BrickworkError
from brickwork.ops.merge_statistics import fisher_diagonal, gram_matrices
from brickwork.registry import register

MergeMethod = Literal[
    "linear",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "slerp",
    "multislerp",
    "model_stock",
    "fisher",
    "regmean",
]
TiesSemantics = Literal["peft", "mergekit"]
METHODS: tuple[str, ...] = get_args(MergeMethod)
NEEDS_BASE = frozenset({"task_arithmetic", "ties", "dare_linear", "dare_ties", "model_stock"})
NEEDS_STATS = frozenset({"fisher", "regmean"})
DEFAULT_DENSITY = {"ties": 0.2, "dare_linear": 0.1, "dare_ties": 0.1}  # TIES paper top-20 %; DARE p = 0.9
PARALLEL = 0.9995  # mergekit's DOT_THRESHOLD: above it SLERP is linear
CHUNK = 1 << 18  # elements per chunk (2 MiB in float64)
F64 = torch.float64

ModelLike = nn.Module | Mapping[str, Tensor]


class Source(Protocol):
    """Named tensors readable by row ranges (a state dict in memory, a safetensors file)."""

    label: str

    def names(self) -> list[str]: ...

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]: ...

    def read(self, name: str, rows: slice | None = None) -> Tensor: ...


class TensorSource:
    """A :class:`Source` over a mapping of tensors (a state dict)."""

    def __init__(self, tensors: Mapping[str, Tensor], label: str) -> None:
        self.tensors, self.label = tensors, label

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        t = self.tensors[name]
        return tuple(t.shape), t.dtype

    def read(self, name: str, rows: slice | None = None) -> Tensor:
        t = self.tensors[name].detach()
        return t if rows is None else t[rows]


@dataclass(frozen=True)
class MergeOptions:
    """Options of one merge (or of the tensors an ``overrides`` pattern matches).

    Attributes:
        method: see the module docstring.
        weights: one per model (default: equal for linear-like methods, 1 for task arithmetic).
        scale: lambda of task arithmetic, TIES and DARE.
        density: fraction kept, in (0, 1] (TIES: by magnitude; DARE: at random); None: the
            method's default (TIES 0.2, DARE 0.1).
        ties: sign election and normalisation, ``peft`` or ``mergekit``.
        t: SLERP's position in [0, 1] (0: the first model, 1: the second).
        alpha: RegMean's scale of the non-diagonal Gram entries, in [0, 1].
        ridge: RegMean's ridge, added to each Gram as ``ridge * m * I``, m the weighted mean of the
            Grams' diagonals (>= 0; 0:
            the unregularised solve, refused for a singular Gram).
        eps: Fisher floor added to every Fisher value.
        normalize: task arithmetic / DARE-linear divide by the weights' sum.
        seed: DARE's masks.
    """

    method: MergeMethod = "linear"
    weights: tuple[float, ...] | None = None
    scale: float = 1.0
    density: float | None = None
    ties: TiesSemantics = "peft"
    t: float = 0.5
    alpha: float = 1.0
    ridge: float = 1e-6
    eps: float = 1e-6
    normalize: bool = False
    seed: int = 0

    def check(self, n: int, has_base: bool, where: str) -> None:
        """Raise :class:`BrickworkError` for options that cannot merge ``n`` models here."""
        at = f"merge ({where})"
        if self.method not in METHODS:
            raise BrickworkError(f"{at}: unknown method {self.method!r}; expected one of {', '.join(METHODS)}")
        if n < 1:
            raise BrickworkError(f"{at}: no models to merge")
        if self.method == "slerp" and n != 2:
            raise BrickworkError(f"{at}: slerp merges exactly 2 models, got {n} (use multislerp for more)")
        if self.method in ("multislerp", "model_stock") and n < 2:
            raise BrickworkError(f"{at}: {self.method} needs at least 2 models, got {n}")
        if self.method in NEEDS_BASE and not has_base:
            raise BrickworkError(f"{at}: {self.method} needs a base model (base=...)")
        d = self.density
        if d is not None and not (isinstance(d, int | float) and 0 < d <= 1):
            raise BrickworkError(f"{at}: density must be in (0, 1], got {d!r}")
        if not 0 <= self.t <= 1:
            raise BrickworkError(f"{at}: t must be in [0, 1], got {self.t!r}")
        if not 0 <= self.alpha <= 1:
            raise BrickworkError(f"{at}: alpha must be in [0, 1], got {self.alpha!r}")
        if not (isinstance(self.ridge, int | float) and math.isfinite(self.ridge) and self.ridge >= 0):
            raise BrickworkError(f"{at}: ridge must be a finite number >= 0, got {self.ridge!r}")
        if self.ties not in get_args(TiesSemantics):
            raise BrickworkError(f"{at}: ties must be 'peft' or 'mergekit', got {self.ties!r}")
        if self.weights is not None:
            if len(self.weights) != n:
                raise BrickworkError(f"{at}: {len(self.weights)} weights for {n} models")
            if not all(math.isfinite(float(w)) for w in self.weights):
                raise BrickworkError(f"{at}: weights must be finite, got {list(self.weights)}")
            if self.method not in ("task_arithmetic", "dare_linear", "ties", "dare_ties") and sum(self.weights) <= 0:
                raise BrickworkError(f"{at}: {self.method} needs weights of positive sum, got {list(self.weights)}")

    def weight_vector(self, n: int) -> Tensor:
        if self.weights is not None:
            return torch.tensor([float(w) for w in self.weights], dtype=F64)
        if self.method in ("task_arithmetic", "dare_linear", "ties", "dare_ties"):
            return torch.ones(n, dtype=F64)
        return torch.full((n,), 1.0 / n, dtype=F64)

    def kept(self) -> float:
        return float(self.density if self.density is not None else DEFAULT_DENSITY.get(self.method, 1.0))


def options_for(name: str, opts: MergeOptions, overrides: Mapping[str, Mapping[str, Any]] | None) -> MergeOptions:
    """``opts`` with every ``overrides`` entry whose glob matches tensor ``name`` applied in order."""
    fields = {f.name for f in dataclasses.fields(MergeOptions)}
    for pattern, changes in (overrides or {}).items():
        if not fnmatch.fnmatchcase(name, pattern):
            continue
        bad = sorted(set(changes) - fields)
        if bad:
            raise BrickworkError(f"merge: overrides[{pattern!r}]: unknown option(s) {bad}; known: {sorted(fields)}")
        changes = {k: tuple(v) if k == "weights" and v is not None else v for k, v in changes.items()}
        opts = dataclasses.replace(opts, **changes)
    return opts


def check_sources(models: Sequence[Source], base: Source | None) -> list[str]:
    """The tensor names all inputs share; one :class:`BrickworkError` naming the first mismatch."""
    if not models:
        raise BrickworkError("merge: no models to merge")
    ref = models[0]
    names = ref.names()
    for s in [*models[1:], *([base] if base is not None else [])]:
        have = set(s.names())
        missing = [k for k in names if k not in have]
        extra = sorted(have - set(names))
        if missing:
            raise BrickworkError(
                f"merge: {s.label} lacks tensor {missing[0]!r} that {ref.label} has "
                f"({len(missing)} missing; different architectures?)"
            )
        if extra:
            raise BrickworkError(
                f"merge: {s.label} has tensor {extra[0]!r} that {ref.label} lacks "
                f"({len(extra)} extra; different architectures?)"
            )
        for k in names:
            (shape, dtype), (shape0, dtype0) = s.info(k), ref.info(k)
            if shape != shape0:
                raise BrickworkError(
                    f"merge: tensor {k!r}: shape {list(shape)} in {s.label}, {list(shape0)} in {ref.label}"
                )
            if dtype != dtype0:
                raise BrickworkError(f"merge: tensor {k!r}: dtype {dtype} in {s.label}, {dtype0} in {ref.label}")
    return names


def _check_stats(name: str, o: MergeOptions, models: Sequence[Source], stats: Sequence[Source] | None) -> bool:
    """Whether tensor ``name`` has statistics for its data-driven method (checked for every model)."""
    if o.method not in NEEDS_STATS:
        return False
    if stats is None or len(stats) != len(models):
        got = "none" if stats is None else len(stats)
        raise BrickworkError(f"merge ({name}): {o.method} needs statistics for each of {len(models)} models, got {got}")
    have = [name in s.names() for s in stats]
    if not any(have):
        return False
    if not all(have):
        raise BrickworkError(f"merge: statistics of model {have.index(False)} lack tensor {name!r} that others have")
    shape, _ = models[0].info(name)
    want = shape if o.method == "fisher" else ((shape[1], shape[1]) if len(shape) == 2 else None)
    if want is None:
        raise BrickworkError(f"merge: regmean: tensor {name!r} of shape {list(shape)} is not a linear weight (out, in)")
    for s in stats:
        got_shape, _ = s.info(name)
        if tuple(got_shape) != tuple(want):
            raise BrickworkError(
                f"merge: {o.method} statistics of tensor {name!r} in {s.label}: "
                f"shape {list(got_shape)}, expected {list(want)}"
            )
    return True


def chunks(shape: Sequence[int], chunk_elems: int = CHUNK) -> list[slice | None]:
    """Row ranges of at most ``chunk_elems`` elements (whole rows); ``[None]`` for a small tensor."""
    numel = math.prod(shape)
    if not shape or numel <= chunk_elems:
        return [None]
    rows = max(1, chunk_elems // max(1, numel // shape[0]))
    return [slice(a, min(a + rows, shape[0])) for a in range(0, shape[0], rows)]


def _bshape(v: Tensor, like: Tensor) -> Tensor:
    """(N,) coefficients viewed to broadcast against (N, ...) ``like``."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def _kth_largest_magnitude(read: Any, chs: list[slice | None], numel: int, k: int) -> float:
    """Exact k-th largest of |tau| (float32 values) over the chunks, in two radix passes (bounded memory).

    Non-negative float32 numbers order like their bit patterns: a histogram of the high 16 bits
    finds the bucket holding the k-th largest, a histogram of the low 16 bits inside it the value.
    """
    if k >= numel:
        return 0.0
    if k <= 0:
        return math.inf
    hist = torch.zeros(1 << 16, dtype=torch.int64)
    for ch in chs:
        bits = read(ch).abs().float().reshape(-1).view(torch.int32).to(torch.int64)
        hist += torch.bincount(bits >> 16, minlength=1 << 16)
    ge = hist.flip(0).cumsum(0).flip(0)  # ge[h]: count with high bits >= h
    hi = int((ge >= k).nonzero().max())
    k -= int(ge[hi] - hist[hi])
    low = torch.zeros(1 << 16, dtype=torch.int64)
    for ch in chs:
        bits = read(ch).abs().float().reshape(-1).view(torch.int32).to(torch.int64)
        low += torch.bincount(bits[(bits >> 16) == hi] & 0xFFFF, minlength=1 << 16)
    lo = int((low.flip(0).cumsum(0).flip(0) >= k).nonzero().max())
    return float(torch.tensor([(hi << 16) | lo], dtype=torch.int32).view(torch.float32))


def _seed(seed: int, name: str, i: int, ch: slice | None) -> int:
    start = 0 if ch is None else ch.start
    return zlib.crc32(f"{seed}:{name}:{i}:{start}".encode())


def _dare(tau: Tensor, o: MergeOptions, name: str, ch: slice | None) -> Tensor:
    """(N, ...) task vectors with each element kept with probability density, rescaled by 1/density."""
    p = o.kept()
    if p >= 1:
        return tau
    out = torch.empty_like(tau)
    for i in range(tau.shape[0]):
        g = torch.Generator().manual_seed(_seed(o.seed, name, i, ch))
        keep = torch.rand(tau.shape[1:], generator=g) < p
        out[i] = tau[i] * keep / p
    return out


def _disjoint(tau: Tensor, w: Tensor, semantics: TiesSemantics) -> Tensor:
    """TIES sign election and disjoint mean of (N, ...) task vectors with weights (N,)."""
    wb = _bshape(w, tau)
    elected = torch.sign(tau.sum(0) if semantics == "peft" else (wb * tau).sum(0))
    agree = (tau != 0) & (torch.sign(tau) == elected)
    num = (wb * tau * agree).sum(0)
    den = agree.to(F64).sum(0) if semantics == "peft" else (wb * agree).sum(0)
    return torch.where(den != 0, num / torch.where(den != 0, den, 1.0), 0.0)


def _gram(read_all: Any, chs: list[slice | None]) -> Tensor:
    """(N, N) inner products of the flattened inputs, accumulated over chunks."""
    k: Tensor | None = None
    for ch in chs:
        x = read_all(ch).flatten(1)
        k = x @ x.T if k is None else k + x @ x.T
    assert k is not None
    return k


def slerp_coefficients(k: Tensor, t: float) -> Tensor:
    """(2,) coefficients of SLERP from the (2, 2) Gram matrix of the two tensors."""
    n0, n1 = math.sqrt(float(k[0, 0])), math.sqrt(float(k[1, 1]))
    lerp = torch.tensor([1 - t, t], dtype=F64)
    if n0 == 0 or n1 == 0:
        return lerp
    dot = max(-1.0, min(1.0, float(k[0, 1]) / (n0 * n1)))
    if abs(dot) > PARALLEL:
        return lerp
    omega = math.acos(dot)
    s = math.sin(omega)
    return torch.tensor([math.sin((1 - t) * omega) / s, math.sin(t * omega) / s], dtype=F64)


def multislerp_coefficients(k: Tensor, w: Tensor) -> Tensor:
    """(N,) coefficients of the tangent-space spherical mean from the (N, N) Gram matrix, weights (N,)."""
    w = w / w.sum()
    norms = k.diagonal().clamp_min(0).sqrt()
    if bool((norms == 0).any()):
        return w
    c = (k / torch.outer(norms, norms)).clamp(-1, 1)  # cosines of the unit directions u_i
    if bool((c.abs() > PARALLEL).all()):
        return w
    s = float(w @ c @ w) ** 0.5  # |sum_j w_j u_j|; p = sum_j (w_j / s) u_j
    cos = (c @ w / s).clamp(-1, 1)
    theta = torch.arccos(cos)
    f = torch.where(theta > 1e-12, theta / torch.sin(theta).clamp_min(1e-300), 1.0)
    beta = w * f - float((w * f * cos).sum()) * w / s  # the tangent mean m in the u basis
    m = float(beta @ c @ beta) ** 0.5
    gamma = math.cos(m) * w / s + (math.sin(m) / m if m > 1e-12 else 1.0) * beta
    return float(w @ norms) * gamma / norms


def model_stock_ratio(k: Tensor) -> float:
    """Jang et al.'s t = N cos / (1 + (N - 1) cos) from the (N, N) Gram matrix of the task vectors."""
    n = k.shape[0]
    norms = k.diagonal().clamp_min(0).sqrt()
    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            d = float(norms[i] * norms[j])
            cosines.append(1.0 if d == 0 else float(k[i, j]) / d)
    cos = max(0.0, min(1.0, sum(cosines) / len(cosines)))
    return n * cos / (1 + (n - 1) * cos)


def merge_tensor(
    name: str,
    models: Sequence[Source],
    o: MergeOptions,
    *,
    base: Source | None = None,
    stats: Sequence[Source] | None = None,
    chunk_elems: int = CHUNK,
) -> Tensor:
    """The merge of tensor ``name`` of every model (options checked by the caller)."""
    shape, dtype = models[0].info(name)
    out = torch.empty(shape, dtype=dtype)
    for ch, v in merge_pieces(name, models, o, base=base, stats=stats, chunk_elems=chunk_elems):
        (out if ch is None else out[ch]).copy_(v)
    return out


def merge_pieces(
    name: str,
    models: Sequence[Source],
    o: MergeOptions,
    *,
    base: Source | None = None,
    stats: Sequence[Source] | None = None,
    chunk_elems: int = CHUNK,
) -> Iterator[tuple[slice | None, Tensor]]:
    """The merge of tensor ``name`` as ``(rows, values)`` pieces in row order, values in its dtype.

    ``rows`` is a slice of the first dimension (``None``: the whole tensor). Pieces come in
    order, so a streaming writer can put each one on disk as it comes (:func:`merge_files`).
    """
    shape, dtype = models[0].info(name)
    if not dtype.is_floating_point:
        vals = [m.read(name) for m in models]
        out_int = vals[0].clone()
        for v in vals[1:]:
            out_int = torch.maximum(out_int, v)
        yield None, out_int
        return
    n = len(models)
    w = o.weight_vector(n)
    chs = chunks(shape, chunk_elems)
    has_stats = _check_stats(name, o, models, stats)

    def xs(ch: slice | None) -> Tensor:
        return torch.stack([m.read(name, ch).to(F64) for m in models])

    def bs(ch: slice | None) -> Tensor:
        assert base is not None
        return base.read(name, ch).to(F64)

    def put(ch: slice | None, v: Tensor) -> tuple[slice | None, Tensor]:
        return ch, v.to(dtype)

    method = o.method
    if method in NEEDS_STATS and not has_stats:
        method = "linear"  # buffers, biases: the weighted average
        w = w / w.sum()
    coef: Tensor | None = None
    if method == "linear":
        coef = w / w.sum()
    elif method == "slerp":
        coef = slerp_coefficients(_gram(xs, chs), o.t)
    elif method == "multislerp":
        coef = multislerp_coefficients(_gram(xs, chs), w)
    if coef is not None:  # one model's chunk at a time, accumulated in place (no (N, ...) stack)
        for ch in chs:
            acc = models[0].read(name, ch).to(F64, copy=True).mul_(float(coef[0]))  # a float64 input stays
            wide = torch.empty_like(acc)  # one float64 buffer per chunk for every later input
            for i in range(1, n):
                acc.add_(wide.copy_(models[i].read(name, ch)), alpha=float(coef[i]))
            yield put(ch, acc)
        return
    if method == "model_stock":
        ratio = model_stock_ratio(_gram(lambda ch: xs(ch) - bs(ch), chs))
        avg = w / w.sum()
        for ch in chs:
            x, b = xs(ch), bs(ch)
            yield put(ch, (1 - ratio) * b + ratio * (_bshape(avg, x) * x).sum(0))
        return
    if method in ("task_arithmetic", "dare_linear"):
        ww = w / w.sum() if o.normalize else w
        if method == "task_arithmetic":  # one model's chunk at a time, as for linear
            for ch in chs:
                b = bs(ch)
                acc = (models[0].read(name, ch) - b).mul_(float(ww[0]))  # float64 by promotion
                for i in range(1, n):
                    acc.add_(models[i].read(name, ch) - b, alpha=float(ww[i]))
                yield put(ch, acc.mul_(o.scale).add_(b))
            return
        for ch in chs:
            b = bs(ch)
            tau = xs(ch) - b
            if method == "dare_linear":
                tau = _dare(tau, o, name, ch)
            yield put(ch, b + o.scale * (_bshape(ww, tau) * tau).sum(0))
        return
    if method in ("ties", "dare_ties"):
        thresholds = [0.0] * n
        if method == "ties":
            k = int(o.kept() * math.prod(shape))
            for i in range(n):
                thresholds[i] = _kth_largest_magnitude(
                    lambda ch, i=i: models[i].read(name, ch).to(F64) - bs(ch), chs, math.prod(shape), k
                )
        for ch in chs:
            b = bs(ch)
            tau = xs(ch) - b
            if method == "ties":
                thr = torch.tensor(thresholds, dtype=torch.float32)
                tau = tau * (tau.abs().float() >= _bshape(thr, tau))
            else:
                tau = _dare(tau, o, name, ch)
            yield put(ch, b + o.scale * _disjoint(tau, w, o.ties))
        return
    assert stats is not None
    if method == "fisher":
        for ch in chs:
            x = xs(ch)
            f = torch.stack([s.read(name, ch).to(F64) for s in stats]) + o.eps
            wf = _bshape(w, x) * f
            yield put(ch, (wf * x).sum(0) / wf.sum(0))
        return
    # regmean: W = (sum_i w_i W_i G~_i)(sum_i w_i G~_i)^-1, rows chunk by chunk
    raw = [s.read(name).to(F64) for s in stats]
    scale = sum(wi * float(g.diagonal().mean()) for wi, g in zip(w.tolist(), raw, strict=True)) / float(w.sum())
    grams = [o.alpha * g + torch.diag((1 - o.alpha) * g.diagonal() + o.ridge * scale) for g in raw]
    gsum = sum(wi * g for wi, g in zip(w.tolist(), grams, strict=True))
    assert isinstance(gsum, Tensor)
    for ch in chs:
        x = xs(ch)
        a = sum(wi * (x[i] @ grams[i]) for i, wi in enumerate(w.tolist()))
        assert isinstance(a, Tensor)
        sol = torch.linalg.solve_ex(gsum, a.T)
        if int(sol.info) != 0:
            raise BrickworkError(
                f"merge: regmean: the summed Gram matrix of {name!r} is singular; "
                "use ridge > 0 (e.g. the default 1e-6) or more data for its statistics"
            )
        yield put(ch, sol.result.T)
    return


def check_merge(
    models: Sequence[Source],
    opts: MergeOptions,
    *,
    base: Source | None = None,
    statistics: Sequence[Source] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, MergeOptions]:
    """Each tensor's options, after every input and option is checked (before anything is computed)."""
    names = check_sources(models, base)
    plans = {k: options_for(k, opts, overrides) for k in names}
    for k, o in plans.items():
        o.check(len(models), base is not None, k)
        _check_stats(k, o, models, statistics)
    for s in statistics or []:
        unknown = sorted(set(s.names()) - set(names))
        if unknown:
            raise BrickworkError(f"merge: {s.label} has tensor {unknown[0]!r} that the models lack")
    return plans


def merge_sources(
    models: Sequence[Source],
    opts: MergeOptions,
    *,
    base: Source | None = None,
    statistics: Sequence[Source] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    chunk_elems: int = CHUNK,
) -> dict[str, Tensor]:
    """Every tensor merged; all inputs and options are checked before any tensor is computed."""
    plans = check_merge(models, opts, base=base, statistics=statistics, overrides=overrides)
    return {
        k: merge_tensor(k, models, o, base=base, stats=statistics, chunk_elems=chunk_elems) for k, o in plans.items()
    }


def _source(m: ModelLike, label: str) -> TensorSource:
    if isinstance(m, nn.Module):
        return TensorSource(m.state_dict(), label)
    if isinstance(m, Mapping):
        return TensorSource(m, label)
    raise BrickworkError(f"merge: {label} is a {type(m).__name__}, expected an nn.Module or a state dict")


def merge_state_dicts(
    states: Sequence[ModelLike],
    method: MergeMethod = "linear",
    *,
    base: ModelLike | None = None,
    statistics: Sequence[Mapping[str, Tensor]] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    chunk_elems: int = CHUNK,
    **options: Any,
) -> dict[str, Tensor]:
    """The merged state dict of ``states`` (modules or state dicts); options as :class:`MergeOptions`.

    ``chunk_elems`` is the engine's chunk size; DARE's masks are drawn per chunk, so a DARE merge
    is reproduced exactly (by :func:`~brickwork.ops.merge_files.merge_files` too) at equal chunk size.
    """
    opts = make_options(method, options)
    models = [_source(m, f"model {i}") for i, m in enumerate(states)]
    stats = None if statistics is None else [TensorSource(s, f"statistics {i}") for i, s in enumerate(statistics)]
    return merge_sources(
        models,
        opts,
        base=None if base is None else _source(base, "base"),
        statistics=stats,
        overrides=overrides,
        chunk_elems=chunk_elems,
    )


def make_options(method: str, options: Mapping[str, Any]) -> MergeOptions:
    """:class:`MergeOptions` from keyword options, one :class:`BrickworkError` for an unknown key."""
    fields = {f.name for f in dataclasses.fields(MergeOptions)}
    bad = sorted(set(options) - fields)
    if bad:
        raise BrickworkError(f"merge: unknown option(s) {bad}; known: {sorted(fields - {'method'})}")
    kw = dict(options)
    if kw.get("weights") is not None:
        kw["weights"] = tuple(kw["weights"])
    return MergeOptions(method=method, **kw)  # type: ignore[arg-type]


@register("op", "merge", injected=("base", "statistics", "data"))
def merge(
    models: Sequence[ModelLike],
    /,
    method: MergeMethod = "linear",
    *,
    base: ModelLike | None = None,
    statistics: Sequence[Mapping[str, Tensor]] | None = None,
    data: Iterable[Tensor | tuple[Tensor, Tensor]] | None = None,
    weights: list[float] | None = None,
    scale: float = 1.0,
    density: float | None = None,
    ties: TiesSemantics = "peft",
    t: float = 0.5,
    alpha: float = 1.0,
    ridge: float = 1e-6,
    eps: float = 1e-6,
    normalize: bool = False,
    seed: int = 0,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> nn.Module:
    """A new model: ``models`` (same architecture) merged by ``method``; inputs are not modified.

    Args:
        models: N modules or state dicts; the first module is copied as the result's structure.
        method: one of :data:`METHODS` (see the module docstring for each one's semantics).
        base: the pre-trained model the task vectors are taken from (task arithmetic, TIES,
            DARE, Model Stock).
        statistics: per model, diagonal Fishers (``fisher``: name -> tensor of the parameter's
            shape) or Gram matrices (``regmean``: ``path.weight`` -> (in, in)).
        data: instead of ``statistics``, batches (B, ...) or (x, y) to estimate them on:
            :func:`fisher_diagonal` (the model's own predictions) or :func:`gram_matrices`.
        weights, scale, density, ties, t, alpha, ridge, eps, normalize, seed: see :class:`MergeOptions`.
        overrides: module-path glob -> options (``{"head.*": {"method": "linear"}}``).

    Returns:
        A copy of the first module among ``models`` (or of ``base``) holding the merged state.
    """
    template = next((m for m in [*models, base] if isinstance(m, nn.Module)), None)
    if template is None:
        raise BrickworkError("merge: no nn.Module among the inputs to copy; use merge_state_dicts for state dicts")
    if statistics is None and data is not None and method in NEEDS_STATS:
        batches = list(data)
        if not all(isinstance(m, nn.Module) for m in models):
            raise BrickworkError(f"merge: {method} from data needs modules, not state dicts")
        estimate = fisher_diagonal if method == "fisher" else gram_matrices
        statistics = [estimate(m, batches) for m in models if isinstance(m, nn.Module)]
    state = merge_state_dicts(
        models,
        method,
        base=base,
        statistics=statistics,
        overrides=overrides,
        weights=weights,
        scale=scale,
        density=density,
        ties=ties,
        t=t,
        alpha=alpha,
        ridge=ridge,
        eps=eps,
        normalize=normalize,
        seed=seed,
    )
    out = copy.deepcopy(template)
    out.load_state_dict(state)
    return out
