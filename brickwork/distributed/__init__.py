"""Scale-out on ``torch.distributed``: process groups, data parallelism, rank-0 guards, expert parallelism.

This package sits at the level of ``train/``: it knows torch's distributed engine and nothing
of configs. A run launched by ``torchrun`` gets a :class:`DistContext` from
:func:`init_from_env`; a single process gets ``DistContext()`` (rank 0 of 1), so callers never
branch on "distributed or not".
"""

from brickwork.distributed.batch import all_sum, local_rows, shard_batch
from brickwork.distributed.data_parallel import DataParallel, gathered, plain_module, wrap
from brickwork.distributed.expert_checkpoint import load_expert_shards, read_expert_shards, save_expert_shards
from brickwork.distributed.expert_parallel import (
    ExpertParallelGroups,
    ExpertParallelMoE,
    clip_expert_parallel_grad_norm,
    expert_parallel,
    expert_parameters,
    ignore_experts_in_ddp,
    reduce_expert_grads,
    reduce_expert_parallel_grads,
)
from brickwork.distributed.process_group import (
    DEFAULT_TIMEOUT_S,
    DistContext,
    current,
    init_from_env,
    launched_by_torchrun,
    shutdown,
    timeout_from_env,
)
from brickwork.distributed.spawn import RankFailed, free_port, run_ranks

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DataParallel",
    "DistContext",
    "RankFailed",
    "all_sum",
    "current",
    "free_port",
    "gathered",
    "init_from_env",
    "launched_by_torchrun",
    "local_rows",
    "plain_module",
    "run_ranks",
    "shard_batch",
    "shutdown",
    "timeout_from_env",
    "wrap",
    # expert parallelism
    "ExpertParallelGroups",
    "ExpertParallelMoE",
    "clip_expert_parallel_grad_norm",
    "expert_parallel",
    "expert_parameters",
    "ignore_experts_in_ddp",
    "load_expert_shards",
    "read_expert_shards",
    "reduce_expert_grads",
    "reduce_expert_parallel_grads",
    "save_expert_shards",
]
