"""The process group that ``torchrun`` describes, and the device mesh over it.

``torchrun`` (torch's elastic launcher) starts one process per rank and tells each where the
rendezvous is through environment variables: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``. :func:`init_from_env` reads them and joins the group with
``torch.distributed``'s own ``env://`` rendezvous (gloo on the CPU, NCCL on CUDA), so brickwork
runs on PyTorch's distributed engine rather than a home-made one. Without ``WORLD_SIZE`` a
process is a single-rank run and no group is created: the same :class:`DistContext` then says
"rank 0 of 1", and every caller treats both cases alike.

Every collective gets a timeout (``BRICKWORK_DIST_TIMEOUT`` seconds, default 300): a rank that
dies leaves the others waiting in a collective; gloo raises once the timeout passes, the run is
recorded as failed and the processes exit, instead of hanging forever.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from brickwork.errors import BrickworkError

#: The variables torchrun sets for every rank; all of them are needed for the rendezvous.
RENDEZVOUS_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
#: Seconds a collective may wait for the other ranks before it raises (a dead rank).
DEFAULT_TIMEOUT_S = 300.0
TIMEOUT_VAR = "BRICKWORK_DIST_TIMEOUT"


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank, the world size, the group and the device.

    A single-process run is ``DistContext()`` (rank 0 of 1, no group): code written against a
    context needs no branch for "not distributed".

    Attributes:
        rank: this process's global rank, ``0 <= rank < world_size``.
        world_size: number of processes.
        local_rank: rank on this machine (picks the CUDA device).
        device: the device this rank computes on.
        group: the default process group, ``None`` for a single process.
        timeout_s: seconds a collective waits before raising.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    group: dist.ProcessGroup | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def active(self) -> bool:
        """True when there is more than one process (collectives are needed)."""
        return self.world_size > 1 and self.group is not None

    @property
    def is_main(self) -> bool:
        """True on rank 0: the one rank that writes the store, reports, plots and checkpoints."""
        return self.rank == 0

    @property
    def backend(self) -> str | None:
        """The group's backend (``"gloo"``, ``"nccl"``), or None without a group."""
        return None if self.group is None else str(dist.get_backend(self.group))

    def mesh(self, shape: tuple[int, ...] | None = None, names: tuple[str, ...] | None = None) -> DeviceMesh:
        """A :class:`DeviceMesh` over all ranks (1-D ``("dp",)`` by default).

        Args:
            shape: mesh shape; its product must be the world size (e.g. ``(dp, ep)``).
            names: one name per mesh dimension (e.g. ``("dp", "ep")``).

        Raises:
            BrickworkError: the shape does not multiply to the world size, or names mismatch.
        """
        shape = shape or (self.world_size,)
        names = names or (("dp",) if len(shape) == 1 else tuple(f"dim{i}" for i in range(len(shape))))
        if len(names) != len(shape):
            raise BrickworkError(f"device mesh: {len(names)} names {names} for a {len(shape)}-D shape {shape}")
        size = 1
        for s in shape:
            size *= s
        if size != self.world_size or min(shape) < 1:
            raise BrickworkError(
                f"device mesh: shape {shape} holds {size} ranks, but the world has {self.world_size}"
                " (the product of the mesh shape must equal --nproc-per-node x nodes)"
            )
        return init_device_mesh(self.device.type, shape, mesh_dim_names=names)


def timeout_from_env() -> float:
    """Collective timeout in seconds: ``BRICKWORK_DIST_TIMEOUT`` or :data:`DEFAULT_TIMEOUT_S`."""
    raw = os.environ.get(TIMEOUT_VAR)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise BrickworkError(f"{TIMEOUT_VAR}={raw!r}: expected a positive number of seconds")
    return value


def launched_by_torchrun() -> bool:
    """True when any rendezvous variable is set (this process was meant to join a group)."""
    return any(v in os.environ for v in RENDEZVOUS_VARS)


def init_from_env(backend: str | None = None, timeout_s: float | None = None) -> DistContext:
    """Join the process group torchrun describes, or return the single-process context.

    Args:
        backend: ``"gloo"`` or ``"nccl"``; default NCCL when CUDA is available, else gloo.
        timeout_s: collective timeout; default :func:`timeout_from_env`.

    Returns:
        The context of this rank. Calling it again after the group exists returns the same
        rank and group (idempotent, so a test or the CLI may call it twice).

    Raises:
        BrickworkError: some rendezvous variables are set and others missing or malformed, the
            backend is unavailable, or the rendezvous cannot be reached.
    """
    if not launched_by_torchrun():
        return DistContext()
    missing = [v for v in RENDEZVOUS_VARS if not os.environ.get(v)]
    if missing:
        raise BrickworkError(
            f"distributed launch: rendezvous variables {', '.join(missing)} are not set"
            " (start the run with `torchrun --nproc-per-node N -m brickwork run CONFIG`"
            " or `brickwork run --nproc N CONFIG`)"
        )
    try:
        rank, world, local = (int(os.environ[v]) for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        int(os.environ["MASTER_PORT"])
    except ValueError:
        shown = {v: os.environ[v] for v in RENDEZVOUS_VARS}
        raise BrickworkError(
            f"distributed launch: expected integer RANK/WORLD_SIZE/LOCAL_RANK/MASTER_PORT, got {shown}"
        ) from None
    if not 0 <= rank < world:
        raise BrickworkError(f"distributed launch: RANK={rank} is outside 0..WORLD_SIZE-1 (WORLD_SIZE={world})")
    timeout = timeout_from_env() if timeout_s is None else timeout_s
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "gloo" and not dist.is_gloo_available():
        raise BrickworkError("distributed launch: this torch build has no gloo backend")
    on_cuda = backend == "nccl"
    device = torch.device("cuda", local % max(torch.cuda.device_count(), 1)) if on_cuda else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend=backend, init_method="env://", timeout=timedelta(seconds=timeout))
        except (RuntimeError, ValueError) as e:  # DistStoreError is a RuntimeError
            where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BrickworkError(f"distributed launch: cannot reach the rendezvous at {where} ({first})") from e
    global _CURRENT
    _CURRENT = DistContext(
        rank=rank, world_size=world, local_rank=local, device=device, group=dist.group.WORLD, timeout_s=timeout
    )
    return _CURRENT


#: The context :func:`init_from_env` joined in this process (the process group is process-wide
#: in torch.distributed too); :func:`current` reads it.
_CURRENT: DistContext | None = None


def current() -> DistContext:
    """The context this process joined with :func:`init_from_env`, or a single process.

    Training (``train.train_with``) reads it, so every stage that trains runs data-parallel
    under torchrun without a rank argument threaded through stages and models.
    """
    return _CURRENT if _CURRENT is not None and dist.is_initialized() else DistContext()


def shutdown(ctx: DistContext) -> None:
    """Leave the process group (no-op for a single process or an already destroyed group)."""
    global _CURRENT
    if ctx.group is not None and dist.is_initialized():
        dist.destroy_process_group()
    _CURRENT = None
