"""The per-tensor merge engine: linear, task arithmetic, TIES, DARE, SLERP, Model Stock, Fisher, RegMean.

Methods act on the chunks of one tensor of every model; the model-level front end
(:func:`~brickwork.ops.merge.merge`, :func:`~brickwork.ops.merge.merge_state_dicts`, option parsing,
module-path ``overrides`` and the checks of whole inputs) is :mod:`brickwork.ops.merge`.

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

import math
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, get_args

import torch
from torch import Tensor

from brickwork.errors import BrickworkError

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
# Elements per arithmetic step inside a chunk: torch's grain size (2^15), so an elementwise op opens
# no OpenMP region (measured: with 2 intra-op threads on a loaded 2-core machine, 8-model linear
# merges spent 48 s wall in barrier waits against 1.4 s with one thread), and a step's float64
# buffers (256 KiB each) stay in L2. Every method below is elementwise along a chunk (sums over
# the models are per element), so the slicing changes no result.
SUB = 1 << 15
F64 = torch.float64


class Source(Protocol):
    """Named tensors readable by row ranges (a state dict in memory, a safetensors file)."""

    label: str

    def names(self) -> list[str]: ...

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]: ...

    def read(self, name: str, rows: slice | None = None, out: Tensor | None = None) -> Tensor:
        """Rows ``rows`` (all: None) of tensor ``name``; into ``out`` (its shape and dtype) when
        given, so a caller can reuse one buffer (a fresh one per read lands in cold memory)."""
        ...


class TensorSource:
    """A :class:`Source` over a mapping of tensors (a state dict)."""

    def __init__(self, tensors: Mapping[str, Tensor], label: str) -> None:
        self.tensors, self.label = tensors, label

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        t = self.tensors[name]
        return tuple(t.shape), t.dtype

    def read(self, name: str, rows: slice | None = None, out: Tensor | None = None) -> Tensor:
        t = self.tensors[name].detach()
        t = t if rows is None else t[rows]
        return t if out is None else out.copy_(t)


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


def check_stats(name: str, o: MergeOptions, models: Sequence[Source], stats: Sequence[Source] | None) -> bool:
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


def _rows(shape: Sequence[int], ch: slice | None) -> tuple[int, ...]:
    """The shape of chunk ``ch`` of a tensor of ``shape``."""
    return tuple(shape) if ch is None else (ch.stop - ch.start, *shape[1:])


def _weighted_sum(
    name: str,
    models: Sequence[Source],
    ch: slice | None,
    shape: Sequence[int],
    c: list[float],
    base: Tensor | None = None,
    buf: Tensor | None = None,
    acc_buf: Tensor | None = None,
) -> Tensor:
    """float64 sum_i c_i (x_i - base) of chunk ``ch`` (no base: sum_i c_i x_i), one model's chunk read
    at a time into one reused buffer ``buf`` (at least the chunk's elements, the tensor's dtype; a
    fresh buffer per read measured 0.43 s of reads for 8 MiniLM files against 0.18 s into a reused
    one), accumulated in place :data:`SUB` elements a step; ``base`` is the flat float64 chunk.
    ``acc_buf`` (float64, at least the chunk's elements): where the sum goes, reused by a caller
    that narrows each chunk's sum before the next (the result is a view of it)."""
    rows = _rows(shape, ch)
    numel = math.prod(rows)
    acc = torch.empty(rows, dtype=F64) if acc_buf is None else acc_buf[:numel].view(rows)
    flat = acc.view(-1)
    wide = torch.empty(min(SUB, flat.numel()), dtype=F64)
    for i, m in enumerate(models):
        into = None if buf is None else buf[: flat.numel()].view(rows)
        x = m.read(name, ch, out=into).reshape(-1)
        for sp in _spans(flat.numel()):
            # Widened by a copy first: add_ straight from a float32 operand (torch's mixed-dtype
            # path) measured 2.8x slower than copy_ + add_ (0.49 s against 0.18 + 0.29 s, 8 files).
            d = flat[sp].copy_(x[sp]) if i == 0 else wide[: sp.stop - sp.start].copy_(x[sp])  # a copy: inputs stay
            if base is not None:
                d.sub_(base[sp])
            if i == 0:
                d.mul_(c[0])
            else:
                flat[sp].add_(d, alpha=c[i])
    return acc


def _narrow(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x.to(dtype)``, SUB elements a step (no OpenMP region)."""
    if x.dtype == dtype:
        return x
    out = torch.empty(x.shape, dtype=dtype)
    src, dst = x.view(-1), out.view(-1)
    for sp in _spans(src.numel()):
        dst[sp].copy_(src[sp])
    return out


def _spans(numel: int) -> list[slice]:
    """Consecutive element ranges of at most :data:`SUB` elements."""
    return [slice(a, min(a + SUB, numel)) for a in range(0, numel, SUB)]


# Tensors up to this many elements: the k-th largest by torch.kthvalue on the whole tensor (two
# 2^16-bin histograms cost more there); above it the radix passes (measured, 590K float32: radix
# 1.3-4.5 ms, kthvalue 11.6 ms, topk 8.4 ms).
SELECT = 1 << 16


def _kth_largest_magnitudes(mags: Any, chs: list[slice | None], numel: int, k: int, n: int) -> list[float]:
    """Exact k-th largest of each model's |tau| (float32 values) over the chunks.

    ``mags(ch)`` gives every model's float32 magnitudes of chunk ``ch`` at once (the base read once
    for all of them). A tensor of at most :data:`SELECT` elements is gathered whole per model
    (256 KiB each) and selected by ``torch.kthvalue``; a larger one in two radix passes with memory
    bounded by the chunks: non-negative float32 numbers order like their bit patterns, so a
    histogram of the high 16 bits finds the bucket holding the k-th largest, a histogram of the
    low 16 bits inside it the value. Both give the same exact order statistic.
    """
    if k <= 0 or k >= numel:
        return [0.0 if k >= numel else math.inf] * n
    if numel <= SELECT:
        parts = [mags(ch) for ch in chs]
        whole = [torch.cat([p[i] for p in parts]) if len(parts) > 1 else parts[0][i] for i in range(n)]
        return [float(m.kthvalue(numel - k + 1).values) for m in whole]
    hist = torch.zeros(n, 1 << 16, dtype=torch.int64)
    for ch in chs:
        for i, m in enumerate(mags(ch)):
            hist[i] += torch.bincount(m.view(torch.int32) >> 16, minlength=1 << 16)  # sign bit 0: >> is exact
    his, ks = _bucket(hist, [k] * n)
    low = torch.zeros(n, 1 << 16, dtype=torch.int64)
    for ch in chs:
        for i, m in enumerate(mags(ch)):
            bits = m.view(torch.int32)
            low[i] += torch.bincount(bits[(bits >> 16) == his[i]] & 0xFFFF, minlength=1 << 16)
    los, _ = _bucket(low, ks)
    both = torch.tensor([(hi << 16) | lo for hi, lo in zip(his, los, strict=True)], dtype=torch.int32)
    return [float(v) for v in both.view(torch.float32)]


def _bucket(hist: Tensor, ks: list[int]) -> tuple[list[int], list[int]]:
    """Per row of (n, B) counts: the highest bucket h with at least k_i counts at or above it, and
    k_i minus the counts above h (the rank of the k-th largest inside bucket h)."""
    top = hist.flip(1).cumsum(1)  # top[i, j]: row i's count in buckets >= B - 1 - j
    j = torch.searchsorted(top, torch.tensor(ks, dtype=torch.int64).view(-1, 1)).view(-1)
    above = torch.where(j > 0, top.gather(1, (j - 1).clamp_min(0).view(-1, 1)).view(-1), 0)
    return [hist.shape[1] - 1 - int(v) for v in j], [k - int(a) for k, a in zip(ks, above, strict=True)]


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


def _dare_keep(o: MergeOptions, name: str, ch: slice | None, n: int, numel: int) -> Tensor:
    """(n, numel) DARE keep masks of one chunk, drawn as :func:`_dare` draws them (same seeds)."""
    p = o.kept()
    if p >= 1:
        return torch.ones(n, numel, dtype=torch.bool)
    out = torch.empty(n, numel, dtype=torch.bool)
    for i in range(n):
        g = torch.Generator().manual_seed(_seed(o.seed, name, i, ch))
        out[i] = (torch.rand(numel, generator=g) < p).view(-1)
    return out


def _disjoint(tau: Tensor, w: Tensor, semantics: TiesSemantics) -> Tensor:
    """TIES sign election and disjoint mean of (N, ...) task vectors with weights (N,)."""
    wb = _bshape(w, tau)
    elected = torch.sign(tau.sum(0) if semantics == "peft" else (wb * tau).sum(0))
    # tau_i agrees when it is non-zero with the elected sign, i.e. tau_i * elected > 0 (exact:
    # elected is -1, 0 or 1; NaN agrees with nothing either way)
    agree = (tau * elected) > 0
    num = (wb * tau * agree).sum(0)
    den = agree.sum(0).to(F64) if semantics == "peft" else (wb * agree).sum(0)  # counts <= N: exact
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
    has_stats = check_stats(name, o, models, stats)

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
    if coef is not None:  # sum_i c_i x_i: one model's chunk at a time, into one read buffer
        c = [float(v) for v in coef]
        most = max(math.prod(_rows(shape, ch)) for ch in chs)
        buf = torch.empty(most, dtype=dtype)
        # _narrow copies the sum out of ``acc`` before the next chunk reuses it; a float64 tensor's
        # sum is the piece itself (handed to the writer), so it gets a fresh one per chunk.
        acc = torch.empty(most, dtype=F64) if dtype != F64 else None
        for ch in chs:
            yield ch, _narrow(_weighted_sum(name, models, ch, shape, c, buf=buf, acc_buf=acc), dtype)
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
        if method == "task_arithmetic":  # base + scale sum_i w_i (x_i - base), as linear
            for ch in chs:
                bflat = bs(ch).reshape(-1)
                acc = _weighted_sum(name, models, ch, shape, [float(v) for v in ww], bflat)
                flat = acc.view(-1)
                for sp in _spans(flat.numel()):
                    flat[sp].mul_(o.scale).add_(bflat[sp])
                yield ch, _narrow(acc, dtype)
            return
        for ch in chs:
            b = bs(ch)
            tau = xs(ch) - b
            if method == "dare_linear":
                tau = _dare(tau, o, name, ch)
            yield put(ch, b + o.scale * (_bshape(ww, tau) * tau).sum(0))
        return
    if method in ("ties", "dare_ties"):
        thr = torch.zeros(n, 1)
        if method == "ties":
            # |x - b| in float32 for inputs of at most 32 bits: float64's difference rounded to
            # float32 is the correctly rounded float32 difference (53 >= 2 * 24 + 2 bits: double
            # rounding is innocuous), so these are the magnitudes the float64 trim compares.
            mid = F64 if dtype.itemsize > 4 else torch.float32

            def mags(ch: slice | None) -> list[Tensor]:
                assert base is not None
                b = base.read(name, ch).to(mid).reshape(-1)
                return [(m.read(name, ch).to(mid).reshape(-1) - b).abs().float() for m in models]

            k = int(o.kept() * math.prod(shape))
            thr = torch.tensor(_kth_largest_magnitudes(mags, chs, math.prod(shape), k, n)).view(n, 1)
        for ch in chs:
            bflat = bs(ch).reshape(-1)
            parts = [m.read(name, ch).reshape(-1) for m in models]
            keep = None if method == "ties" else _dare_keep(o, name, ch, n, parts[0].numel())
            out = torch.empty(bflat.shape, dtype=dtype)
            buf = torch.empty(n, min(SUB, bflat.numel()), dtype=F64)
            for sp in _spans(bflat.numel()):
                b = bflat[sp]
                tau = buf[:, : sp.stop - sp.start]
                for i, x in enumerate(parts):
                    tau[i].copy_(x[sp])
                tau.sub_(b)
                if keep is None:
                    tau.mul_(tau.abs().float() >= thr)
                elif o.kept() < 1:
                    tau = tau * keep[:, sp] / o.kept()
                out[sp] = b + o.scale * _disjoint(tau, w, o.ties)
            yield ch, out.view(_rows(shape, ch))
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
