"""A one-paragraph description of the machine a benchmark ran on (for docs/benchmarks.md)."""

from __future__ import annotations

import os
import platform

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(malloc: str | None = None) -> str:
    """CPU, cores visible, torch threads, torch version, GPU if any, and the malloc setting."""
    parts = [
        f"CPU {cpu_model()}",
        f"{len(os.sched_getaffinity(0))} cores visible",
        f"torch {torch.__version__} with {torch.get_num_threads()} threads",
        f"Python {platform.python_version()}",
    ]
    if torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name(0)}")
    env = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    parts.append(f"malloc: {malloc or (env if env else 'glibc defaults')}")
    return "; ".join(parts)
