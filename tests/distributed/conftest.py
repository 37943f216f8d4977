"""Spawned gloo ranks for the distributed tests; skipped with a reason where gloo is missing."""

from __future__ import annotations

import os
import signal
from types import SimpleNamespace
from typing import Any

import pytest
import torch.distributed as dist

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("this torch build has no torch.distributed gloo backend", allow_module_level=True)


def _cli_main(ctx: Any, argv: list[str]) -> int:
    """A rank running the CLI's ``main``, the very code a ``torchrun -m brickwork`` rank runs."""
    from brickwork import cli

    return cli.main(argv)


def _cli_main_rank1_dies_after_first_save(ctx: Any, argv: list[str]) -> int:
    """As :func:`_cli_main`, but rank 1 SIGKILLs itself right after the first training state is saved."""
    if ctx.rank == 1:
        import brickwork.train.loop as loop

        save = loop.save_training_state

        def save_then_die(*args: object, **kwargs: object) -> None:
            save(*args, **kwargs)  # type: ignore[arg-type]
            os.kill(os.getpid(), signal.SIGKILL)

        loop.save_training_state = save_then_die  # type: ignore[assignment]
    return _cli_main(ctx, argv)


@pytest.fixture(scope="session")
def cli_ranks() -> SimpleNamespace:
    """Rank functions for ``run_ranks``: ``main`` (the CLI) and ``die_after_first_save`` (rank 1 killed)."""
    return SimpleNamespace(main=_cli_main, die_after_first_save=_cli_main_rank1_dies_after_first_save)
