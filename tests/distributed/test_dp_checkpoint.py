"""Training states of data-parallel runs are the single-process format: they resume anywhere.

An epoch trained by 2 FSDP2 (or DDP) ranks, saved (gathered, by rank 0), then continued by one
process (and the reverse) ends with the weights of one uninterrupted single process (float64).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint.state_dict  # noqa: F401  (imported once here, not in each forked rank)
import torch.distributed.fsdp  # noqa: F401
from torch import Tensor

from brickwork.data.base import Split
from brickwork.distributed import DistContext, run_ranks, wrap
from brickwork.models import transformer_lm
from brickwork.train import FitConfig, cross_entropy, fit

VOCAB, T = 11, 6


def _split(seed: int, n: int) -> Split:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (n, T), generator=g)
    return Split(x, torch.roll(x, -1, dims=1))


def _train(ctx: DistContext, strategy: str, epochs: int, state: Path | None) -> dict[str, Tensor]:
    torch.manual_seed(0)
    model = transformer_lm(in_shape=(T,), num_classes=VOCAB, dim=16, depth=1, heads=2, mlp_ratio=2).double()
    engine = wrap(model, ctx, strategy)  # type: ignore[arg-type]
    opt = torch.optim.AdamW(engine.parameters(), lr=0.01, weight_decay=0.1)
    # constant lr: a 1-epoch fit then takes the steps of the first epoch of a 3-epoch fit
    cfg = FitConfig(epochs=epochs, batch_size=7, seed=3, grad_clip=1.0, schedule="constant")
    fit(engine, _split(1, 19), _split(2, 5), cross_entropy(), opt, cfg, state_path=state, progress=False)
    from brickwork.distributed import gathered

    return {k: v.clone() for k, v in gathered(engine).state_dict().items()}


def _ranked(ctx: DistContext, strategy: str, epochs: int, state: Path | None) -> dict[str, Tensor]:
    return _train(ctx, strategy, epochs, state)


def _max_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in b)


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_a_state_saved_by_2_ranks_resumes_in_1_process_and_back(tmp_path, strategy):
    want = _train(DistContext(), strategy, 2, None)
    run_ranks(_ranked, 2, strategy, 1, tmp_path / "a")  # epoch 1 on 2 ranks, saved by rank 0
    assert _max_diff(_train(DistContext(), strategy, 2, tmp_path / "a"), want) <= 1e-10  # epoch 2 in one
    _train(DistContext(), strategy, 1, tmp_path / "b")  # epoch 1 in one process
    got = run_ranks(_ranked, 2, strategy, 2, tmp_path / "b")  # epoch 2 on 2 ranks
    assert max(_max_diff(g, want) for g in got) <= 1e-10
