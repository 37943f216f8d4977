"""Data parallelism is exact: 2 (or 4) gloo ranks take the single-process step on the full batch.

Each case builds the same tiny random model in every rank and in this process, takes 3 AdamW
steps (weight decay, gradient clipping) on global batches of 5, 4 and 1 rows, so ranks get
uneven slices and, in the last step, one rank an empty one; the loss of every step and every
parameter afterwards must equal the single-process run (float64: 1e-10, float32: 1e-6).
Dropout is 0 in every model (it is by default) and routers have no noise: randomness inside a
forward is drawn per rank, so it would not match. The MoE's load-balancing loss is weighted 0:
it is a statistic of each rank's slice, not of the whole batch (docs/scaling.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from brickwork.distributed import DistContext, RankFailed, run_ranks
from brickwork.distributed.data_parallel import gathered, wrap
from brickwork.models import cnn, mlp, moe_mlp, nested_mlp, sparse_mlp, transformer_lm, vit
from brickwork.train import cross_entropy, train_step

IMAGE, VOCAB = (1, 8, 8), 11
# name -> (builder, arguments, input shape, classes)
CASES: dict[str, tuple[Callable[..., nn.Module], dict[str, Any], tuple[int, ...], int]] = {
    "mlp": (mlp, {"width": 16, "depth": 2}, (12,), 5),
    "cnn": (cnn, {"channels": (4, 8), "norm": "group"}, IMAGE, 5),
    "vit": (vit, {"dim": 16, "depth": 1, "heads": 2, "patch": 4, "mlp_ratio": 2}, IMAGE, 5),
    "lm": (transformer_lm, {"dim": 16, "depth": 1, "heads": 2, "mlp_ratio": 2}, (6,), VOCAB),
    "moe": (moe_mlp, {"width": 16, "depth": 1, "hidden": 8, "num_experts": 4}, (12,), 5),
    "nested": (nested_mlp, {"width": 16, "depth": 2, "sampling": "sandwich"}, (12,), 5),
    "sparse": (sparse_mlp, {"width": 16, "depth": 1, "groups": 4, "in_groups": 4}, (12,), 5),
}
SIZES = (5, 4, 1)  # rows of the 3 global batches: uneven slices, then an empty one on rank 1
LOSS = cross_entropy()
AUX = {"load_balance": 0.0, "z_loss": 0.0}


def _data(case: str, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    _, _, shape, classes = CASES[case]
    g = torch.Generator().manual_seed(7)
    n = sum(SIZES)
    if case == "lm":
        x = torch.randint(0, VOCAB, (n, *shape), generator=g)
        return x, torch.roll(x, -1, dims=1)
    return torch.randn(n, *shape, generator=g, dtype=dtype), torch.randint(0, classes, (n,), generator=g)


def _train(case: str, dtype: torch.dtype, ctx: DistContext, strategy: str) -> tuple[list[float], dict[str, Tensor]]:
    build, args, shape, classes = CASES[case]
    torch.manual_seed(0)
    model = build(in_shape=shape, num_classes=classes, **args).to(dtype)
    engine = wrap(model, ctx, strategy)  # type: ignore[arg-type]
    opt = torch.optim.AdamW(engine.parameters(), lr=0.02, weight_decay=0.1)
    x, y = _data(case, dtype)
    losses, start = [], 0
    for size in SIZES:
        r = train_step(engine, x[start : start + size], y[start : start + size], LOSS, opt, AUX, grad_clip=0.5)
        losses.append(r.loss)
        start += size
    return losses, {k: v.detach().clone() for k, v in gathered(engine).state_dict().items()}


def _ranked(ctx: DistContext, case: str, dtype: torch.dtype, strategy: str) -> tuple[list[float], dict[str, Tensor]]:
    return _train(case, dtype, ctx, strategy)


def _check(case: str, dtype: torch.dtype, strategy: str, world: int = 2) -> None:
    tol = 1e-10 if dtype == torch.float64 else 1e-6
    want_loss, want = _train(case, dtype, DistContext(), strategy)
    results = run_ranks(_ranked, world, case, dtype, strategy)
    for rank, (losses, state) in enumerate(results):
        assert losses == pytest.approx(want_loss, abs=tol, rel=0), f"rank {rank}"
        assert state.keys() == want.keys()
        for k, v in want.items():
            if v.is_floating_point():
                err = (state[k] - v).abs().max().item()
                assert err <= tol, f"rank {rank} {case} {strategy}: {k} differs by {err:.3g}"
            else:
                assert torch.equal(state[k], v), k
    moved = max((want[k] - v).abs().max().item() for k, v in _initial(case, dtype).items())
    assert moved > 1e-3  # the steps did move the weights: equality is not trivial


def _initial(case: str, dtype: torch.dtype) -> dict[str, Tensor]:
    build, args, shape, classes = CASES[case]
    torch.manual_seed(0)
    return {
        k: v
        for k, v in build(in_shape=shape, num_classes=classes, **args).to(dtype).state_dict().items()
        if v.is_floating_point()
    }


@pytest.mark.parametrize("case", sorted(CASES))
def test_ddp_steps_equal_the_full_batch_steps_float64(case):
    _check(case, torch.float64, "ddp")


@pytest.mark.parametrize("case", sorted(set(CASES) - {"nested"}))  # nested: refused, below
def test_fsdp2_steps_equal_the_full_batch_steps_float64(case):
    _check(case, torch.float64, "fsdp")


def _wrap_nested_fsdp(ctx: DistContext) -> None:
    build, args, shape, classes = CASES["nested"]
    wrap(build(in_shape=shape, num_classes=classes, **args), ctx, "fsdp")


def test_fsdp2_refuses_a_model_that_backpropagates_inside_its_objective():
    with pytest.raises(RankFailed, match="FSDP2 cannot shard NestedModel: its NestedModel backpropagates"):
        run_ranks(_wrap_nested_fsdp, 2)


def test_ddp_float32_within_1e6():
    _check("mlp", torch.float32, "ddp")


def test_ddp_on_4_ranks():
    _check("lm", torch.float64, "ddp", world=4)


def _nan_on_rank_1(ctx: DistContext) -> tuple[bool, bool]:
    build, args, shape, classes = CASES["mlp"]
    torch.manual_seed(0)
    engine = wrap(build(in_shape=shape, num_classes=classes, **args).double(), ctx, "ddp")
    opt = torch.optim.AdamW(engine.parameters(), lr=0.02)
    before = [p.detach().clone() for p in engine.parameters()]
    x, y = _data("mlp", torch.float64)
    x = x[:4].clone()
    x[3] = float("nan")  # in rank 1's half of the batch only
    r = train_step(engine, x, y[:4], LOSS, opt)
    same = all(torch.equal(a, b) for a, b in zip(before, engine.parameters(), strict=True))
    return r.skipped, same


def test_a_non_finite_loss_on_one_rank_skips_the_step_on_every_rank():
    assert run_ranks(_nan_on_rank_1, 2) == [(True, True), (True, True)]
