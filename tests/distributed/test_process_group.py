"""Joining the group torchrun describes: rank/world from the environment, mesh, bad rendezvous."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from brickwork.distributed import DistContext, RankFailed, init_from_env, run_ranks
from brickwork.errors import BrickworkError


def _ranks_and_sum(ctx: DistContext) -> tuple[int, int, float, tuple[int, ...]]:
    t = torch.tensor([float(ctx.rank + 1)])
    dist.all_reduce(t)
    mesh = ctx.mesh((ctx.world_size,), ("dp",))
    return ctx.rank, ctx.world_size, float(t), tuple(mesh.mesh.tolist())


def test_ranks_join_one_group_and_reduce():
    got = run_ranks(_ranks_and_sum, 2)
    assert got == [(0, 2, 3.0, (0, 1)), (1, 2, 3.0, (0, 1))]


def _bad_mesh(ctx: DistContext) -> None:
    ctx.mesh((3,), ("dp",))


def test_a_mesh_that_does_not_fit_the_world_is_one_clear_error():
    with pytest.raises(RankFailed, match="shape \\(3,\\) holds 3 ranks, but the world has 2"):
        run_ranks(_bad_mesh, 2)


def test_single_process_is_rank_0_of_1(monkeypatch):
    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(v, raising=False)
    ctx = init_from_env()
    assert (ctx.rank, ctx.world_size, ctx.active, ctx.is_main, ctx.group) == (0, 1, False, True, None)


def test_a_partial_rendezvous_names_what_is_missing(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for v in ("LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(v, raising=False)
    with pytest.raises(BrickworkError, match="LOCAL_RANK, MASTER_ADDR, MASTER_PORT are not set"):
        init_from_env()


def test_an_unreachable_rendezvous_fails_within_the_timeout(monkeypatch):
    from brickwork.distributed import free_port

    env = dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(BrickworkError, match="cannot reach the rendezvous at 127.0.0.1"):
        init_from_env(timeout_s=1.0)
    assert not dist.is_initialized()
