"""SEMA bricks: exact at the start, the mixture as the formula says, descriptors' z-scores by hand,
task heads in order; the continual loop's bookkeeping (average accuracy, forgetting) by hand."""

import pytest
import torch

from brickwork.models import mlp
from brickwork.nn.sema import Descriptor, SEMALayer, TaskHeads
from brickwork.train.sema import ContinualResult, sema_like, sema_model


def _layer(seed: int, dim: int = 6) -> SEMALayer:
    torch.manual_seed(seed)
    base = torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.GELU()).double()
    return SEMALayer(base, dim, rank=3, descriptor_rank=2).double()


@pytest.mark.parametrize("seed", range(3))
def test_new_adapters_change_nothing_and_trained_ones_mix_by_the_router(seed):
    layer = _layer(seed)
    x = torch.randn(5, 6, dtype=torch.float64)
    assert torch.equal(layer(x), layer.base(x))  # no adapter
    for _ in range(3):
        layer.add_adapter()
    layer.double()
    assert torch.equal(layer(x), layer.base(x))  # up-projections start at zero: bit-exact
    for a in layer.adapters:
        torch.nn.init.normal_(a.up.weight)
    logits = torch.cat([r(x) for r in layer.router], dim=1)
    g = logits.softmax(1)
    want = layer.base(x) + sum(g[:, k : k + 1] * a.up(torch.relu(a.down(x))) for k, a in enumerate(layer.adapters))
    assert torch.allclose(layer(x), want, rtol=0, atol=1e-12)
    tokens = torch.randn(2, 4, 6, dtype=torch.float64)  # (B, T, D): the router reads the mean token
    gt = torch.cat([r(tokens.mean(1)) for r in layer.router], dim=1).softmax(1)
    assert torch.allclose(layer.gates(tokens), gt, rtol=0, atol=1e-12)


def test_descriptor_z_scores_and_the_shift_signal():
    torch.manual_seed(0)
    d = Descriptor(6, 2).double()
    x = torch.randn(64, 6, dtype=torch.float64)
    rec = d.decoder(torch.relu(d.encoder(x)))
    losses = ((rec - x) ** 2).mean(1)
    assert torch.allclose(d.losses(x), losses, rtol=0, atol=1e-12)
    d.fit_statistics(losses)
    assert torch.allclose(d.z_scores(x), (losses - losses.mean()).abs() / losses.std(), rtol=0, atol=1e-12)
    layer = _layer(1)
    layer.add_adapter()
    layer.double()
    layer.descriptors[0].fit_statistics(layer.descriptors[0].losses(x))
    assert layer.shift_score(x) < 1.0 < 3.0 < layer.shift_score(x + 4.0)  # a moved distribution is flagged
    assert SEMALayer(layer.base, 6, 3, 2).shift_score(x) == float("inf")  # no descriptor: always new


def test_descriptors_leave_their_loss_only_while_learning():
    layer = _layer(2)
    layer.add_adapter()
    layer.double()
    x = torch.randn(3, 6, dtype=torch.float64)
    layer(x)
    assert layer.descriptors[0].aux_losses == {}
    layer.descriptors[0].learning = True
    layer(x)
    assert torch.allclose(layer.descriptors[0].aux_losses["sema_descriptor"], layer.descriptors[0].losses(x).mean())


def test_task_heads_concatenate_in_task_order_and_replay_rebuilds_the_model():
    heads = TaskHeads(4, [2, 3])
    x = torch.randn(5, 4)
    out = heads(x)
    assert out.shape == (5, 5) and torch.equal(out[:, 2:], heads.heads[1](x))
    backbone = mlp(in_shape=(1, 4, 4), num_classes=10, width=8, depth=2)
    model = sema_model(backbone, 4, 2, adapters=[1, 3], classes=[2, 2, 2])
    recipe = {"op": "sema", "rank": 4, "descriptor_rank": 2, "adapters": [1, 3], "classes": [2, 2, 2]}
    again = sema_like(mlp(in_shape=(1, 4, 4), num_classes=10, width=8, depth=2), recipe)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in again.state_dict().items()}
    assert model(torch.randn(2, 1, 4, 4)).shape == (2, 6)


def test_average_accuracy_and_forgetting_by_hand():
    acc = [[0.9], [0.7, 0.8], [0.5, 0.6, 0.95]]
    r = ContinualResult(model=None, accuracy=acc, adapters=[], train_flops=0.0)  # type: ignore[arg-type]
    assert r.average_accuracy == pytest.approx((0.5 + 0.6 + 0.95) / 3, abs=1e-12)
    assert r.forgetting == pytest.approx(((0.9 - 0.5) + (0.8 - 0.6)) / 2, abs=1e-12)
