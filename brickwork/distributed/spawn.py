"""Run a function on N local ranks joined in one gloo group (tests and benchmarks).

This is the in-process counterpart of ``torchrun``: it sets the same rendezvous variables
torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) in each
child, so the children join through the very :func:`init_from_env` a torchrun launch uses.
Children are forked where the platform allows it (no re-import of torch: a 2-rank test costs
well under a second of start-up on 2 cores), else spawned (``fn`` must then be picklable).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

from brickwork.distributed.process_group import DistContext, init_from_env, shutdown


def free_port() -> int:
    """A TCP port on localhost that was free a moment ago (for a rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child(
    fn: Callable[..., Any], rank: int, world: int, port: int, threads: int, timeout_s: float, args: tuple, out: Any
) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(threads)
    ctx: DistContext | None = None
    try:
        ctx = init_from_env(backend="gloo", timeout_s=timeout_s)
        # plain pickle: tensors travel as bytes, not as shared memory that dies with this process
        out.put((rank, True, pickle.dumps(fn(ctx, *args))))
    except BaseException as e:  # reported to the parent, which raises it with the rank's traceback
        out.put((rank, False, f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        if ctx is not None:
            shutdown(ctx)


class RankFailed(RuntimeError):
    """A rank raised, died or did not finish in time; the message holds its traceback."""


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    threads: int = 1,
    timeout_s: float = 120.0,
    collective_timeout_s: float = 30.0,
) -> list[Any]:
    """Run ``fn(ctx, *args)`` on ``world_size`` local processes and return each rank's result.

    Args:
        fn: called in every child with its :class:`DistContext`; returns a picklable value.
        world_size: number of ranks.
        threads: torch intra-op threads per rank.
        timeout_s: wall-clock limit for the whole run; ranks still alive are killed.
        collective_timeout_s: each collective's timeout inside the children.

    Returns:
        The results, indexed by rank.

    Raises:
        RankFailed: a rank raised (its traceback is in the message), exited without a result,
            or the run exceeded ``timeout_s``.
    """
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mpc = mp.get_context(method)
    out = mpc.Queue()
    port, limit = free_port(), collective_timeout_s
    procs = [
        mpc.Process(target=_child, args=(fn, r, world_size, port, threads, limit, args, out), daemon=True)  # type: ignore[attr-defined]
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        deadline = time.monotonic() + timeout_s
        while len(results) + len(errors) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                late = sorted(set(range(world_size)) - set(results))
                raise RankFailed(f"ranks {late} did not finish in {timeout_s} s")
            try:
                rank, ok, value = out.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
                if dead:
                    codes = [procs[r].exitcode for r in dead]
                    raise RankFailed(f"ranks {dead} exited with {codes} and no result") from None
                continue
            if ok:
                results[rank] = pickle.loads(value)
            else:
                errors.append(value)
        if errors:
            raise RankFailed("\n".join(errors))
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    return [results[r] for r in range(world_size)]
