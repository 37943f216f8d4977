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
