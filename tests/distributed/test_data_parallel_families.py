"""Data parallelism is exact for the families test_data_parallel.py does not build.

The issue's goal is every model family that ships: test_data_parallel.py covers MLP, CNN, ViT,
LM, MoE (an MLP), nested (an MLP) and group-sparse (static wiring) under DDP and FSDP2; this file
adds early exits (exit heads and their weighted objective), the MoE LM, the nested CNN, ViT and
LM (SortedNet sampling, each sub-network backpropagated inside ``training_loss``) and group-sparse
layers that rewire after every step: SET's random regrowth, RigL's gradient regrowth of edges
and of blocks (its scores are gradients the layer captures itself, which ``DataParallel`` averages
over the ranks before the update: without that, each rank regrew its own edges and the replicas
diverged), and G2GNet's Hebbian regrowth of edges and of blocks (its activation sums, which
``DataParallel`` adds over the ranks before they are folded: each rank's slice alone gave each
rank its own correlations).
Two gloo ranks are started once and train every family in turn, 3 AdamW steps (weight decay,
clipping) on global batches of 5, 4 and 1 rows, float64; the loss of every step and every
parameter and buffer (rewired masks included) must equal the single-process run within 1e-10.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from brickwork.distributed import DistContext, run_ranks
from brickwork.distributed.data_parallel import gathered, wrap
from brickwork.models import early_exit, moe_lm, nested_cnn, nested_lm, nested_vit, sparse_mlp
from brickwork.nn.sparse.rewiring import RewiringSettings
from brickwork.train import cross_entropy, train_step

IMAGE, VOCAB = (1, 8, 8), 11


def _rewire(regrow: str, level: str = "edge") -> RewiringSettings:
    """Rewiring after every optimizer step, half of each layer's movable edges (or blocks) at once."""
    return RewiringSettings(regrow=regrow, level=level, interval=1, fraction=0.5, decay="constant")  # type: ignore[arg-type]


SPARSE = {"width": 16, "depth": 1, "groups": 4, "in_groups": 4, "density": 0.5}
# name -> (builder, arguments, input shape, classes)
FAMILIES: dict[str, tuple[Callable[..., nn.Module], dict[str, Any], tuple[int, ...], int]] = {
    "early_exit": (early_exit, {"base": {"name": "mlp", "width": 16, "depth": 2}}, (12,), 5),
    "moe_lm": (moe_lm, {"dim": 16, "depth": 1, "heads": 2, "hidden": 8, "num_experts": 4}, (6,), VOCAB),
    "nested_cnn": (nested_cnn, {"channels": (4, 8)}, IMAGE, 5),
    "nested_vit": (nested_vit, {"dim": 16, "depth": 1, "heads": 2, "patch": 4}, IMAGE, 5),
    "nested_lm": (nested_lm, {"dim": 16, "depth": 1, "heads": 2}, (6,), VOCAB),
    "sparse_gradient": (sparse_mlp, {**SPARSE, "rewiring": _rewire("gradient")}, (12,), 5),
    "sparse_random": (sparse_mlp, {**SPARSE, "rewiring": _rewire("random")}, (12,), 5),
    "sparse_gradient_blocks": (sparse_mlp, {**SPARSE, "rewiring": _rewire("gradient", "group")}, (12,), 5),
    "sparse_hebbian": (sparse_mlp, {**SPARSE, "rewiring": _rewire("hebbian")}, (12,), 5),
    "sparse_hebbian_blocks": (sparse_mlp, {**SPARSE, "rewiring": _rewire("hebbian", "group")}, (12,), 5),
}
SIZES = (5, 4, 1)  # rows of the 3 global batches: uneven slices, then an empty one on rank 1
LOSS = cross_entropy()
AUX = {"load_balance": 0.0, "z_loss": 0.0}  # batch statistics of a rank's slice (docs/scaling.md)
Result = tuple[list[float], dict[str, Tensor]]


def _build(family: str) -> nn.Module:
    build, args, shape, classes = FAMILIES[family]
    torch.manual_seed(0)
    return build(in_shape=shape, num_classes=classes, **args).double()


def _data(family: str) -> tuple[Tensor, Tensor]:
    _, _, shape, classes = FAMILIES[family]
    g = torch.Generator().manual_seed(7)
    n = sum(SIZES)
    if classes == VOCAB:
        x = torch.randint(0, VOCAB, (n, *shape), generator=g)
        return x, torch.roll(x, -1, dims=1)
    return torch.randn(n, *shape, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


def _train(family: str, ctx: DistContext) -> Result:
    engine = wrap(_build(family), ctx, "ddp")
    opt = torch.optim.AdamW(engine.parameters(), lr=0.02, weight_decay=0.1)
    x, y = _data(family)
    losses, start = [], 0
    for size in SIZES:
        r = train_step(engine, x[start : start + size], y[start : start + size], LOSS, opt, AUX, grad_clip=0.5)
        losses.append(float(r.loss))
        start += size
    return losses, {k: v.detach().clone() for k, v in gathered(engine).state_dict().items()}


def _every_family(ctx: DistContext) -> dict[str, Any]:
    return {family: _train(family, ctx) for family in FAMILIES}


@pytest.fixture(scope="module")
def single() -> dict[str, Any]:
    """The single-process runs (first: the ranks are then forked with every import done)."""
    return _every_family(DistContext())


@pytest.fixture(scope="module")
def ranked(single) -> list[dict[str, Any]]:
    """Both ranks' results for every family, from one start of the 2 ranks."""
    return run_ranks(_every_family, 2)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_ddp_steps_equal_the_full_batch_steps_float64(family, single, ranked):
    want_loss, want = single[family]
    for rank, results in enumerate(ranked):
        losses, state = results[family]
        assert losses == pytest.approx(want_loss, abs=1e-10, rel=0), f"rank {rank}"
        assert state.keys() == want.keys()
        for k, v in want.items():
            if v.is_floating_point():
                err = (state[k] - v).abs().max().item()
                assert err <= 1e-10, f"rank {rank} {family}: {k} differs by {err:.3g}"
            else:
                assert torch.equal(state[k], v), f"rank {rank} {family}: {k}"
    initial = _build(family).state_dict()
    moved = max((want[k] - v).abs().max().item() for k, v in initial.items() if v.is_floating_point())
    assert moved > 1e-3  # the steps did move the weights: equality is not trivial


@pytest.mark.parametrize(
    "family", ["sparse_gradient", "sparse_gradient_blocks", "sparse_hebbian", "sparse_hebbian_blocks"]
)
def test_the_rewiring_families_did_rewire(family, single):
    """Equal masks would prove little if no step had moved an edge or a block."""
    _, state = single[family]
    moved = sum(int(v) for k, v in state.items() if k.endswith(("edges_moved", "blocks_moved")))
    assert moved > 0
