"""A DDP step makes one all-reduce: the step's scalars ride in the last gradient bucket.

Every collective the comm hook issues goes through ``torch.distributed.all_reduce``, so counting
its calls in the ranks counts the step's collectives (DDP issues none of its own once a hook is
registered). A float32 model's step is one all-reduce of (parameters + scalars) values; a
bfloat16 model's bucket is too narrow for the scalars, so they take their own float64 one. The
sums are checked by the exactness tests (test_data_parallel.py: every step's loss, and a
non-finite loss on one rank skipping the step on both).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from brickwork.distributed import DistContext, run_ranks, wrap
from brickwork.models import mlp
from brickwork.train import cross_entropy, train_step

# Building the first optimizer imports torch._dynamo (~10 s here); once in this process, so the
# forked ranks inherit it (as test_expert_parallel.py does).
torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])


def _collectives(ctx: DistContext, dtype: torch.dtype) -> list[tuple[int, str]]:
    torch.manual_seed(0)
    engine = wrap(mlp(in_shape=(12,), num_classes=5, width=16, depth=1).to(dtype), ctx, "ddp")
    opt = torch.optim.AdamW(engine.parameters(), lr=0.01)
    x, y = torch.randn(6, 12, dtype=dtype), torch.randint(0, 5, (6,))
    train_step(engine, x, y, cross_entropy(), opt)  # the first step builds DDP's buckets
    seen: list[tuple[int, str]] = []
    reduce = dist.all_reduce

    def counted(t: torch.Tensor, *args: object, **kwargs: object) -> object:
        seen.append((t.numel(), str(t.dtype)))
        return reduce(t, *args, **kwargs)  # type: ignore[arg-type]

    dist.all_reduce = counted  # type: ignore[assignment]
    try:
        r = train_step(engine, x, y, cross_entropy(), opt)
    finally:
        dist.all_reduce = reduce
    assert not r.skipped
    return seen


def _params() -> int:
    return sum(p.numel() for p in mlp(in_shape=(12,), num_classes=5, width=16, depth=1).parameters())


def test_a_float32_ddp_step_makes_one_all_reduce_carrying_the_scalars():
    for seen in run_ranks(_collectives, 2, torch.float32):
        assert seen == [(_params() + 2, "torch.float32")]  # gradients, then the loss and the skip flag


def test_a_bfloat16_bucket_leaves_the_scalars_their_own_float64_all_reduce():
    for seen in run_ranks(_collectives, 2, torch.bfloat16):
        assert seen == [(2, "torch.float64"), (_params(), "torch.bfloat16")]
