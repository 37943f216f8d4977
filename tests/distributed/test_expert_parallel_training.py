"""Expert parallelism inside the training loop: ``train_with``'s engine is the single-process step.

A tiny MoE MLP and a tiny MoE LM, wrapped as ``TrainSettings(expert_parallel=P)`` wraps them
(``distributed.wrap(model, ctx, strategy, P)``), take 3 AdamW steps (weight decay, clipping at
0.5) through ``train.train_step`` on global batches of 5, 4 and 1 rows (so the last step's rank 1
computes on a borrowed row, which must count nowhere), with every router auxiliary loss weighted
in (the losses are global-batch ones under EP). Loss of every step and every parameter afterwards
equal the single-process run to 1e-10 in float64, and so do Adam's moments (the experts'
gathered): EP 2 on 2 ranks, EP 1 (plain DDP with global-batch router losses), a 2 x 2 dp x ep
mesh on 4 ranks with DDP and with FSDP2 for the non-expert parameters, and Shazeer et al.'s
noisy top-k router's importance and load losses (its noise made a function of the token, the
same in one process and on every rank). And a training state saved at EP 2 on 2 ranks (the
single-process format, experts gathered) resumes on a 2 x 2 mesh and at EP 1 with the
uninterrupted single-process weights (1e-10).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any
from unittest.mock import patch

import pytest
import torch
from torch import Tensor, nn

from brickwork.data.base import Split
from brickwork.distributed import DistContext, run_ranks
from brickwork.distributed.data_parallel import gathered, optimizer_state, wrap
from brickwork.models import moe_lm, moe_mlp
from brickwork.nn.routing import MoESettings, NoisyTopKRouter, TopKRouter, noisy_topk
from brickwork.train import FitConfig, cross_entropy, fit, train_step

VOCAB, T = 11, 6
# rows of the 3 global batches per world size: uneven slices, then an empty one (a borrowed row)
SIZES = {2: (5, 4, 1), 4: (5, 4, 3)}
LOSS = cross_entropy()
AUX = {"load_balance": 0.3, "z_loss": 0.2, "importance": 0.5, "load": 0.5}


def _model(case: str) -> nn.Module:
    torch.manual_seed(0)
    routing = MoESettings(router="noisy_topk" if case == "noisy" else "topk", top_k=2)
    if case == "lm":
        model = moe_lm(
            in_shape=(T,), num_classes=VOCAB, dim=8, depth=1, heads=2, hidden=8, num_experts=4, routing=routing
        )
    else:
        model = moe_mlp(in_shape=(12,), num_classes=5, width=8, depth=2, hidden=8, num_experts=4, routing=routing)
    for m in model.modules():
        if isinstance(m, TopKRouter):
            m.z_loss = True  # both Switch's and ST-MoE's losses
        if isinstance(m, NoisyTopKRouter):
            nn.init.normal_(m.w_gate, std=0.5)  # appendix A starts at zero; make routing depend on the input
            nn.init.normal_(m.w_noise, std=0.5)
    return model.double()


def _data(case: str, world: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(7)
    n = sum(SIZES[world])
    if case == "lm":
        x = torch.randint(0, VOCAB, (n, T), generator=g)
        return x, torch.roll(x, -1, dims=1)
    return torch.randn(n, 12, generator=g, dtype=torch.float64), torch.randint(0, 5, (n,), generator=g)


def _token_noise(clean: Tensor) -> Tensor:
    """Noise that is a function of the token (its clean logits): the same in one process and on
    any rank, where ``randn_like`` draws per rank (docs/scaling.md). Still N(0, 1)-sized."""
    return torch.sin(37.0 * clean) * 1.7


def _steps(
    ctx: DistContext, case: str, world: int, ep: int | None, strategy: str = "ddp"
) -> tuple[list[float], dict[str, Tensor], Any]:
    if case == "noisy":
        with patch.object(noisy_topk.torch, "randn_like", _token_noise):
            return _run_steps(ctx, case, world, ep, strategy)
    return _run_steps(ctx, case, world, ep, strategy)


def _run_steps(
    ctx: DistContext, case: str, world: int, ep: int | None, strategy: str
) -> tuple[list[float], dict[str, Tensor], Any]:
    engine = wrap(_model(case), ctx, strategy, ep)  # type: ignore[arg-type]
    opt = torch.optim.AdamW(engine.parameters(), lr=0.02, weight_decay=0.1)
    x, y = _data(case, world)
    losses, start = [], 0
    for size in SIZES[world]:
        r = train_step(engine, x[start : start + size], y[start : start + size], LOSS, opt, AUX, grad_clip=0.5)
        losses.append(r.loss)
        start += size
    state = {k: v.detach().clone() for k, v in gathered(engine).state_dict().items()}
    return losses, state, optimizer_state(engine, opt)


def _check(case: str, world: int, ep: int, strategy: str = "ddp") -> None:
    want_loss, want, want_opt = _steps(DistContext(), case, world, None)
    for rank, (losses, state, opt) in enumerate(run_ranks(_steps, world, case, world, ep, strategy)):
        assert losses == pytest.approx(want_loss, abs=1e-10, rel=0), f"rank {rank}"
        assert state.keys() == want.keys()
        for k, v in want.items():
            assert (state[k] - v).abs().max().item() <= 1e-10, f"rank {rank}: {k}"
        assert opt["param_groups"][0]["params"] == want_opt["param_groups"][0]["params"]
        for i, st in want_opt["state"].items():  # Adam's moments of every expert, gathered
            for k, v in st.items():
                assert (opt["state"][i][k] - v).abs().max().item() <= 1e-10, f"rank {rank}: state {i} {k}"


def test_ep2_on_2_ranks_equals_the_single_process_mlp():
    _check("mlp", 2, 2)


def test_ep1_is_data_parallelism_with_global_batch_router_losses():
    _check("mlp", 2, 1)


def test_dp2_x_ep2_on_4_ranks_equals_the_single_process_lm():
    _check("lm", 4, 2)


def test_ep2_with_shazeers_importance_and_load_losses_equals_the_single_process():
    _check("noisy", 2, 2)


def test_fsdp2_with_ep_on_4_ranks_equals_the_single_process_lm():
    _check("lm", 4, 2, "fsdp")


def _fit(ctx: DistContext, ep: int | None, epochs: int, state: Path) -> dict[str, Tensor]:
    engine = wrap(_model("lm"), ctx, "ddp", ep)
    opt = torch.optim.AdamW(engine.parameters(), lr=0.01, weight_decay=0.1)
    cfg = FitConfig(epochs=epochs, batch_size=7, seed=3, grad_clip=1.0, schedule="constant", aux_weights=AUX)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, VOCAB, (19, T), generator=g)
    fit(engine, Split(x, torch.roll(x, -1, dims=1)), Split(x[:0], x[:0]), LOSS, opt, cfg, state_path=state)
    return {k: v.clone() for k, v in gathered(engine).state_dict().items()}


def test_a_state_saved_at_ep2_on_2_ranks_resumes_at_ep2_on_4_and_at_ep1(tmp_path):
    want = _fit(DistContext(), None, 2, tmp_path / "one")  # 2 epochs in one process
    run_ranks(_fit, 2, 2, 1, tmp_path / "a")  # epoch 1 at EP 2 on 2 ranks, saved by rank 0
    for suffix in (".json", ".safetensors"):
        shutil.copy(tmp_path / f"a{suffix}", tmp_path / f"b{suffix}")
    for world, ep, state in ((4, 2, "a"), (2, 1, "b")):  # epoch 2 on a 2 x 2 mesh; at EP 1
        for got in run_ranks(_fit, world, ep, 2, tmp_path / state):
            assert max((got[k] - v).abs().max().item() for k, v in want.items()) <= 1e-10, (world, ep)
