"""JEI-DNN's joint training (exit-probability weighting, best-exit gate targets, alternating
phases, four gate features) and ModularStarEncoder's depth-weighted multi-exit loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from brickwork.models import mlp
from brickwork.models.nested import early_exit
from brickwork.nn import ClassifierHead
from brickwork.nn.exits import (
    EarlyExit,
    ExitGate,
    exit_distribution,
    jei_gate_features,
    jei_gate_loss,
    jei_gate_targets,
)

W, K = 12, 5


def _model(objective: str = "jei", **kw) -> EarlyExit:
    torch.manual_seed(0)
    base = mlp((1, 8, 8), K, width=W, depth=4)
    heads = {i: ClassifierHead(W, K) for i in (0, 2)}
    gates = {i: ExitGate("jei") for i in heads} if objective == "jei" else None
    return EarlyExit(base, heads, gates=gates, objective=objective, **kw).double()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, K, (6,), generator=g)


def test_exit_distribution_sums_to_one_per_sample() -> None:
    torch.testing.assert_close(
        exit_distribution([torch.tensor([0.5]), torch.tensor([0.2])]), torch.tensor([[0.5, 0.1, 0.4]])
    )
    gates = [torch.rand(50, dtype=torch.float64) for _ in range(4)]
    q = exit_distribution(gates)
    assert q.shape == (50, 5) and bool((q >= 0).all())
    torch.testing.assert_close(q.sum(1), torch.ones(50, dtype=torch.float64), rtol=0, atol=1e-12)


def _set_gates(m: EarlyExit, biases: list[float]) -> None:
    assert m.gates is not None
    with torch.no_grad():
        for gate, b in zip(m.gates.values(), biases, strict=True):
            gate.proj.weight.zero_()
            gate.proj.bias.fill_(b)


def test_heads_phase_weights_each_sample_loss_by_its_exit_probability() -> None:
    m, (x, y) = _model(), _data()
    _set_gates(m, [0.0, math.log(0.25 / 0.75)])  # g = 0.5, 0.25 -> q = 0.5, 0.125, 0.375
    assert m.jei_phase() == "heads"
    loss = m.training_loss(x, y, F.cross_entropy)
    outs = m.all_exits(x)
    ce = torch.stack([F.cross_entropy(z, y, reduction="none") for z in outs], 1)  # (B, 3)
    expected = (ce * torch.tensor([0.5, 0.125, 0.375], dtype=torch.float64)).sum(1).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    loss.backward()
    assert all(p.grad is None for p in m.gates.parameters())  # gates are not trained in this phase

    # every sample certain to exit at the first gate: only that exit's head (and the layers below) learn
    m2 = _model()
    _set_gates(m2, [60.0, 0.0])  # sigmoid(60) == 1 in float64
    m2.training_loss(x, y, F.cross_entropy).backward()
    assert m2.exits["0"].proj.weight.grad.abs().sum() > 0
    assert m2.exits["2"].proj.weight.grad.abs().sum() == 0 and m2.head.proj.weight.grad.abs().sum() == 0


def test_gate_targets_and_loss_on_a_constructed_example() -> None:
    ce = torch.tensor([[0.1, 0.5, 0.9], [2.0, 1.9, 0.3], [1.0, 0.2, 0.25]], dtype=torch.float64)
    costs = torch.tensor([0.25, 0.5, 1.0], dtype=torch.float64)
    # lambda = 0.2: totals [0.15, 0.6, 1.1], [2.05, 2.0, 0.5], [1.05, 0.3, 0.45]
    assert jei_gate_targets(ce, costs, 0.2).tolist() == [0, 2, 1]
    zeros = torch.zeros(2, 2, dtype=torch.float64)
    ln2 = math.log(2.0)
    # targets [0, 2]: gate targets [[1, 1], [0, 0]]: ratio 1, every BCE(0, .) = ln 2
    assert float(jei_gate_loss(zeros, torch.tensor([0, 2]))) == pytest.approx(ln2, rel=1e-12)
    # targets [1, 2]: [[0, 1], [0, 0]]: one 1 among four, weighted 3: mean(1, 3, 1, 1) ln 2
    assert float(jei_gate_loss(zeros, torch.tensor([1, 2]))) == pytest.approx(1.5 * ln2, rel=1e-12)


def test_phases_alternate_and_the_gates_phase_trains_gates_only() -> None:
    m, (x, y) = _model(phase_steps=2), _data()
    phases = []
    for _ in range(5):
        phases.append(m.jei_phase())
        m.training_loss(x, y, F.cross_entropy)
    assert phases == ["heads", "heads", "gates", "gates", "heads"] and int(m.jei_step) == 5
    m.jei_step.fill_(2)
    m.zero_grad()
    loss = m.training_loss(x, y, F.cross_entropy)
    outs = m.all_exits(x)
    ce = torch.stack([F.cross_entropy(z, y, reduction="none") for z in outs], 1)
    logits = torch.stack([m.gates[str(i)].logit(z) for i, z in zip(m.exit_layers, outs, strict=False)], 1)
    expected = jei_gate_loss(logits, jei_gate_targets(ce, m.costs.double(), m.cost_weight))
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.gates.parameters())
    assert m.head.proj.weight.grad is None and m.exits["0"].proj.weight.grad is None


def test_jei_gate_reads_four_features() -> None:
    f = jei_gate_features(torch.zeros(3, K))  # uniform prediction
    torch.testing.assert_close(f, torch.tensor([[1 / K, math.log(K), 0.0, math.log(K)]]).expand(3, 4))
    sharp = jei_gate_features(torch.tensor([[10.0, 0.0, 0.0, 0.0, 0.0]]))
    assert sharp[0, 0] > 0.99 and sharp[0, 1] < 0.01 and sharp[0, 2] > 0.99 and sharp[0, 3] < sharp[0, 1]
    assert ExitGate("jei").proj.in_features == 4
    built = early_exit((1, 8, 8), K, base={"name": "mlp", "width": W, "depth": 3}, objective="jei")
    assert built.gates is not None and all(g.features == "jei" for g in built.gates.values())


def test_depth_weighted_is_modular_star_encoders_loss() -> None:
    m, (x, y) = _model("depth_weighted"), _data()
    outs = m.all_exits(x)
    ce = [F.cross_entropy(z, y) for z in outs]
    # exits after layers 0 and 2 of 4: alpha = 1/4, 3/4; the final head 1
    torch.testing.assert_close(
        m.training_loss(x, y, F.cross_entropy), 0.25 * ce[0] + 0.75 * ce[1] + ce[2], rtol=1e-12, atol=0
    )
    with pytest.raises(ValueError, match="depth_weighted"):
        _model("depth_weighted", weights=[1.0, 1.0, 1.0])
