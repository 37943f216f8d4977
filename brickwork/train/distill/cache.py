"""Teacher output caching: the teacher's tapped tensors for every training row, computed once.

A frozen teacher in eval mode maps each training sample to the same tensors every epoch, so
distillation need not run it again: :func:`build_cache` runs it once over the training split
(in order, in batches) and :class:`TeacherCache` hands out the rows of a batch by index. The
result is the same training as with a live teacher, bit for bit on the CPU (tested), *when*
the teacher's output for a sample depends on that sample alone.

That is what :func:`check_cacheable` checks before anything is cached, refusing with one line:

- inputs that change between epochs (augmentation, noise, re-sampled crops: ``augmented``):
  the teacher would see other inputs than those cached;
- a teacher whose output for a row depends on the other rows of its batch: batch norm in
  training mode, expert-choice routing (experts pick tokens across the batch), capacity
  limits that drop tokens. Shuffling changes every batch each epoch, so a cached row would be
  what the teacher gave in another batch. Checked by running a probe batch whole, reversed and
  in halves: every row must come out the same up to float rounding (a dense teacher on the CPU
  gives bit-identical rows; a top-k MoE teacher groups rows per expert, so its rows may differ
  in the last bits, and so may the final weights of cached and live training, by rounding only).

In a file: :meth:`TeacherCache.save` writes safetensors + JSON (``persist.save_tensors``),
bound to the SHA-256 of the teacher's weights, of the training inputs and to the taps; a file
made for another teacher, other data or other taps is refused on :meth:`TeacherCache.load`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from brickwork.data.batching import input_batches
from brickwork.errors import BrickworkError, CheckpointError
from brickwork.persist import load_tensors, save_tensors
from brickwork.train.distill.taps import Tap, TapRecorder

_SEP = "|"


def tensor_digest(tensors: Sequence[Tensor]) -> str:
    """SHA-256 over the bytes of ``tensors`` (moved to the CPU, contiguous), in order."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_digest(model: nn.Module) -> str:
    """SHA-256 of a model's state (parameters and buffers, in state-dict order)."""
    return tensor_digest(list(model.state_dict().values()))


@torch.no_grad()
def _tapped(teacher: nn.Module, taps: Sequence[Tap], x: Tensor) -> dict[Tap, Tensor]:
    values = TapRecorder(teacher, taps, where="teacher cache").run(x)
    return {tap: values[tap] for tap in taps}


def _same(a: Tensor, b: Tensor) -> bool:
    """Equal up to float rounding: a routed layer groups rows per expert, so its sums may round
    differently in another batch; a real dependence (expert choice) moves outputs far more."""
    return torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def check_cacheable(teacher: nn.Module, taps: Sequence[Tap], probe: Tensor, *, augmented: bool = False) -> None:
    """Refuse caching where it would change training (see the module docstring).

    Args:
        teacher: the frozen teacher (eval mode).
        taps: the teacher's taps that would be cached.
        probe: (b, ...) training inputs, b >= 2.
        augmented: the training inputs change from epoch to epoch.

    Raises:
        BrickworkError: one line saying why caching is wrong here.
    """
    if augmented:
        raise BrickworkError(
            "teacher cache: the training inputs change every epoch (augmentation), so the teacher's "
            "outputs cannot be computed once; set cache: none"
        )
    if teacher.training:
        raise BrickworkError("teacher cache: the teacher is in training mode; its outputs depend on the batch")
    if len(probe) < 2:
        return
    whole = _tapped(teacher, taps, probe)
    flipped = _tapped(teacher, taps, probe.flip(0))
    half = len(probe) // 2
    first, second = _tapped(teacher, taps, probe[:half]), _tapped(teacher, taps, probe[half:])
    for tap in taps:
        halves = torch.cat([first[tap], second[tap]])
        if not (_same(whole[tap], flipped[tap].flip(0)) and _same(whole[tap], halves)):
            raise BrickworkError(
                f"teacher cache: the teacher's {tap} for a sample depends on the other samples in its batch "
                "(batch statistics, expert-choice routing or a capacity limit), and shuffling changes the "
                "batches every epoch; set cache: none to run the teacher live"
            )


class TeacherCache:
    """The teacher's tapped tensors for rows 0..N-1 of the training split.

    Attributes:
        values: tap -> (N, ...) tensor.
        meta: what the cache is bound to (teacher and data digests, taps, rows).
    """

    def __init__(self, values: dict[Tap, Tensor], meta: dict[str, object]) -> None:
        self.values = values
        self.meta = meta

    def __len__(self) -> int:
        return len(next(iter(self.values.values())))

    def lookup(self, rows: Tensor) -> dict[Tap, Tensor]:
        """The cached tensors of ``rows`` ((B,) indices into the training split)."""
        return {tap: v[rows] for tap, v in self.values.items()}

    def to(self, device: str | torch.device) -> TeacherCache:
        return TeacherCache({t: v.to(device) for t, v in self.values.items()}, self.meta)

    def save(self, stem: str | Path) -> Path:
        """Write ``stem.safetensors`` and ``stem.json`` (atomically; bound to :attr:`meta`)."""
        tensors = {f"{tap.path}{_SEP}{tap.io}": v for tap, v in self.values.items()}
        return save_tensors(stem, tensors, {"kind": "teacher_cache", **self.meta})

    @classmethod
    def load(cls, stem: str | Path, expect: dict[str, object]) -> TeacherCache:
        """Read a cache file, refusing one made for another teacher, other data or other taps."""
        try:
            tensors, meta = load_tensors(stem, expect={"kind": "teacher_cache", **expect})
        except CheckpointError as e:
            raise CheckpointError(f"teacher cache {stem}: {e}") from None
        values = {}
        for key, v in tensors.items():
            path, io = key.rsplit(_SEP, 1)
            values[Tap(path, "input" if io == "input" else "output")] = v
        return cls(values, {k: meta[k] for k in expect})


def cache_binding(teacher: nn.Module, taps: Sequence[Tap], x: Tensor) -> dict[str, object]:
    """What a cache for ``teacher`` at ``taps`` on training inputs ``x`` is bound to."""
    return {
        "teacher_sha256": model_digest(teacher),
        "data_sha256": tensor_digest([x]),
        "taps": [str(t) for t in taps],
        "rows": len(x),
    }


@torch.no_grad()
def build_cache(
    teacher: nn.Module,
    taps: Sequence[Tap],
    x: Tensor,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    augmented: bool = False,
    file: str | Path | None = None,
) -> TeacherCache:
    """Run ``teacher`` once over the training inputs ``x`` (N, ...) and keep its tapped tensors.

    With ``file``, a cache already written there for the same teacher, data and taps is read
    instead; otherwise the new cache is written there.

    Raises:
        BrickworkError: caching would change training (:func:`check_cacheable`); a file made for
            another teacher, other data or other taps.
    """
    taps = list(dict.fromkeys(taps))
    binding = cache_binding(teacher, taps, x)
    if file is not None and Path(f"{file}.json").exists():
        return TeacherCache.load(file, binding).to(device)
    check_cacheable(teacher, taps, x[: min(len(x), 16)].to(device), augmented=augmented)
    parts: dict[Tap, list[Tensor]] = {tap: [] for tap in taps}
    for xb in input_batches(x, batch_size, device=device):
        for tap, v in _tapped(teacher, taps, xb).items():
            parts[tap].append(v)
    cache = TeacherCache({tap: torch.cat(vs) for tap, vs in parts.items()}, binding)
    if file is not None:
        cache.save(file)
    return cache
