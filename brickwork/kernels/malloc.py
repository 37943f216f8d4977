"""glibc malloc thresholds for benchmarks and long CPU runs.

By default glibc serves allocations above a dynamic mmap threshold (from 128 KiB, growing
to at most 32 MiB) with fresh ``mmap`` pages and returns them to the kernel on free. PyTorch's
CPU allocator calls ``malloc`` per tensor, so every large temporary of a forward/backward gets
zero-filled fresh pages: measured at about 5.5 GB/s against 29 GB/s into reused memory, which
made the same MoE forward measure 3.7x dense in one process and 6.9x in another
(``/work/shared/notes/cpu-measurements.md``). Raising the mmap and trim thresholds keeps large
blocks in the heap for reuse.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable, Sequence

import torch

from brickwork.kernels import autotune

# mallopt parameter numbers from <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4

# glibc caps the mmap threshold at HEAP_MAX/2 (32 MiB on 64-bit); larger values are rejected.
DEFAULT_MMAP_THRESHOLD = 32 * 1024 * 1024
# The largest value mallopt's int argument takes: freed heap memory is never returned to the OS.
DEFAULT_TRIM_THRESHOLD = 2**31 - 1


def tune_glibc_malloc(
    mmap_threshold: int = DEFAULT_MMAP_THRESHOLD,
    trim_threshold: int = DEFAULT_TRIM_THRESHOLD,
    disable_mmap: bool = False,
) -> str:
    """Raise glibc's mmap and trim thresholds in this process, if glibc is the allocator.

    Call before large tensors are allocated (allocations made earlier keep their mmap pages).
    Setting the mmap threshold explicitly also disables glibc's dynamic adjustment of it.
    glibc caps the threshold at 32 MiB, so larger blocks are still mmapped unless
    ``disable_mmap`` (``M_MMAP_MAX = 0``) serves every allocation from the heap.

    Returns:
        A one-line description of the setting in force, for benchmark headers.
    """
    env = {k: os.environ[k] for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_") if k in os.environ}
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return f"glibc mallopt unavailable; allocator defaults (env {env or 'unset'})"
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok_mmap = mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
    ok_trim = mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) == 1
    ok_max = mallopt(_M_MMAP_MAX, 0) == 1 if disable_mmap else True
    if not (ok_mmap and ok_trim and ok_max):
        return f"mallopt refused (mmap ok={ok_mmap}, trim ok={ok_trim}, max ok={ok_max}); env {env or 'unset'}"
    text = f"glibc mallopt M_MMAP_THRESHOLD={mmap_threshold} M_TRIM_THRESHOLD={trim_threshold}"
    return text + (" M_MMAP_MAX=0" if disable_mmap else "")


# glibc's documented start values (mallopt(3)); setting them explicitly disables the dynamic
# mmap threshold, so "default" is glibc's starting state, not its adapted one.
_GLIBC_MMAP_THRESHOLD = 128 * 1024
_GLIBC_TRIM_THRESHOLD = 128 * 1024
_GLIBC_MMAP_MAX = 65536

SETTINGS = autotune.KINDS["malloc"]
"""``no-mmap`` (raised thresholds, every block from the heap), ``tuned`` (raised thresholds only),
``default`` (glibc's start values)."""


def set_malloc(setting: str) -> str:
    """Apply one of :data:`SETTINGS` in this process; returns the one-line description."""
    if setting == "no-mmap":
        return tune_glibc_malloc(disable_mmap=True)
    if setting == "tuned":
        text = tune_glibc_malloc()
        _mallopt(_M_MMAP_MAX, _GLIBC_MMAP_MAX)  # undo an earlier no-mmap
        return text
    if setting == "default":
        ok = [
            _mallopt(p, v)
            for p, v in (
                (_M_MMAP_THRESHOLD, _GLIBC_MMAP_THRESHOLD),
                (_M_TRIM_THRESHOLD, _GLIBC_TRIM_THRESHOLD),
                (_M_MMAP_MAX, _GLIBC_MMAP_MAX),
            )
        ]
        return "glibc defaults" + ("" if all(ok) else " (mallopt unavailable)")
    raise ValueError(f"set_malloc: unknown setting {setting!r}; expected one of {', '.join(SETTINGS)}")


def _mallopt(param: int, value: int) -> bool:
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(fn(param, value) == 1)


def choose_malloc(
    measure: Callable[[str], float], dims: Sequence[int], mode: str, dtype: torch.dtype = torch.float32
) -> str:
    """The glibc setting measured fastest for one training or inference step of the shape class
    ``dims``, timed once per machine and class (cached, see :mod:`brickwork.kernels.autotune`);
    ``measure(setting)`` returns the step's seconds in a **fresh process** that applied ``setting``
    before allocating anything (e.g. :func:`brickwork.analysis.timing.isolated` with
    ``malloc_setting``). Returns the setting's name; the caller applies it (:func:`set_malloc`),
    best at the start of the process that will run the steps.

    Why fresh processes: a setting changes the heap for the rest of a process. Switched inside one
    process, each candidate also saw the heap the previous one had grown, and on the Intel Xeon of
    session 7 that measured ``tuned`` 13 % faster than ``no-mmap`` for the 8192-token x 16-expert
    step, while cells started with ``tuned`` ran the same step and its dense baseline 25-40 % slower
    than cells started with ``no-mmap`` (``docs/benchmarks.md``, the Intel pass).
    """
    shape = autotune.shape_class("malloc", dims, dtype, "cpu", mode)
    return autotune.choose(shape, list(SETTINGS), measure=lambda: {name: measure(name) for name in SETTINGS})
