"""Early exits: threshold 1.0 is the full model, compaction gives the same answers as computing
everything, exited samples cost nothing, and the three training objectives."""

import pytest
import torch
import torch.nn.functional as F

from brickwork.analysis.compute import FlopMeter
from brickwork.models import mlp
from brickwork.models.nested import early_exit
from brickwork.nn import ClassifierHead
from brickwork.nn.exits import EarlyExit, ExitAt, ExitGate, choose_exit, prediction_features

pytestmark = pytest.mark.usefixtures("one_torch_thread")


W, K, IN = 16, 5, 64


def model(policy="confidence", objective="weighted", **kw):
    torch.manual_seed(0)
    base = mlp((1, 8, 8), K, width=W, depth=4)
    heads = {i: ClassifierHead(W, K) for i in (0, 2)}
    gated = policy == "gate" or objective in ("jei", "joint_gates")
    gates = {i: ExitGate("jei" if objective == "jei" else "prediction") for i in heads} if gated else None
    return EarlyExit(base, heads, gates=gates, policy=policy, objective=objective, **kw)


def reference(m, x):
    """Every layer and exit on every sample, then each sample's first exit with score > threshold."""
    outs = m.all_exits(x)
    out, taken = outs[-1].clone(), torch.zeros(len(x), dtype=torch.bool)
    for layer, z in zip(m.exit_layers, outs, strict=False):
        leave = (m.score(layer, z) > m.threshold) & ~taken
        out[leave], taken = z[leave], taken | leave
    return out


@pytest.mark.parametrize("policy", ["confidence", "entropy", "gate"])
def test_threshold_one_is_the_full_model_and_zero_exits_at_the_first_exit(policy):
    m = model(policy, threshold=1.0).eval()
    x = torch.randn(7, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(m(x), m.head(m.body(m.stem(x))))
        assert (m.record.layer == 3).all()
        m.threshold.fill_(0.0)
        torch.testing.assert_close(m(x), m.exits["0"](m.body.taps(m.stem(x), [0])[0]))
        assert (m.record.layer == 0).all()


@pytest.mark.parametrize("policy", ["confidence", "entropy", "gate"])
def test_compaction_gives_the_answers_of_computing_everything_and_exited_samples_cost_nothing(policy):
    m = model(policy).eval()
    x = torch.randn(64, 1, 8, 8) * 3
    with torch.no_grad():
        scores = m.score(0, m.all_exits(x)[0])
        m.threshold.fill_(float(scores.median()))  # about half leave at the first exit
        meter = FlopMeter()
        with meter:
            out = m(x)
        torch.testing.assert_close(out, reference(m, x))
        left = m.record.layer
    n0, n2 = int((left == 0).sum()), int((left == 2).sum())
    assert 0 < n0 < 64
    reach = [64, 64 - n0, 64 - n0, 64 - n0 - n2]  # samples entering layers 0..3
    gate = 3 if policy == "gate" else 0  # the gate's Linear(3, 1) per scored sample
    expected = 2 * (64 * IN * W + sum(reach) * W * W + (reach[0] + reach[2]) * (W * K + gate) + reach[3] * W * K)
    assert meter.total == expected


def test_the_exit_rule_takes_the_first_exit_strictly_above_the_threshold():
    scores = [torch.tensor([0.9, 0.5, 0.2, 0.7, 1.0]), torch.tensor([0.95, 0.8, 0.3, 0.7, 1.0])]
    assert choose_exit(scores, 0.7).tolist() == [0, 1, 2, 2, 0]  # 2: no exit (0.7 is not above 0.7)
    assert choose_exit(scores, 0.0).tolist() == [0, 0, 0, 0, 0]
    assert choose_exit(scores, 1.0).tolist() == [2] * 5  # nobody leaves at 1.0, even with a score of 1.0
    with pytest.raises(ValueError, match="no exit"):
        choose_exit([], 0.5)


def test_exit_at_answers_from_one_exit_for_every_sample():
    m = model().eval()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(ExitAt(m, 2)(x), m.all_exits(x)[1])
        torch.testing.assert_close(ExitAt(m, 3)(x), m.all_exits(x)[2])


def test_prediction_features_are_in_unit_range_and_per_sample_for_sequences():
    f = prediction_features(torch.randn(3, 7, 11))
    assert f.shape == (3, 3) and (f >= 0).all() and (f <= 1 + 1e-6).all()
    sharp = prediction_features(torch.tensor([[100.0, 0.0, 0.0]]))
    torch.testing.assert_close(sharp, torch.ones(1, 3), atol=1e-4, rtol=0)


def test_weighted_and_distill_objectives():
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, K, (8,))
    m = model(weights=[1.0, 2.0, 3.0])
    outs = m.all_exits(x)
    manual = sum(w * F.cross_entropy(z, y) for w, z in zip([1, 2, 3], outs, strict=True)) / 6
    torch.testing.assert_close(m.training_loss(x, y, F.cross_entropy), manual)
    # With distillation weight 0 it is the weighted objective; with weight 1 the exits learn only
    # from the (detached) final head, which then gets no gradient from them.
    d0 = model(objective="distill", distill_weight=0.0, weights=[1.0, 2.0, 3.0])
    torch.testing.assert_close(d0.training_loss(x, y, F.cross_entropy), manual)
    d1 = model(objective="distill", distill_weight=1.0, weights=[1.0, 1.0, 0.0])
    d1.training_loss(x, y, F.cross_entropy).backward()
    assert d1.head.proj.weight.grad is None or d1.head.proj.weight.grad.abs().sum() == 0
    assert d1.exits["0"].proj.weight.grad.abs().sum() > 0


def test_joint_gates_objective_trains_gates_and_heads_in_one_step():
    m = model(objective="joint_gates", cost_weight=0.5)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, K, (8,))
    loss = m.training_loss(x, y, F.cross_entropy)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.gates.parameters())
    assert m.exits["2"].proj.weight.grad.abs().sum() > 0
    plain = model(objective="weighted").training_loss(x, y, F.cross_entropy)
    assert loss > plain  # gate term: expected loss plus lambda * cost, both positive


def test_validation_of_exits_and_gates():
    base = mlp((1, 8, 8), K, width=W, depth=3)
    with pytest.raises(ValueError, match="before the last"):
        EarlyExit(base, {2: ClassifierHead(W, K)})
    with pytest.raises(ValueError, match="gate"):
        EarlyExit(base, {0: ClassifierHead(W, K)}, policy="gate")


def test_builder_wraps_any_model_with_measured_costs():
    lm = early_exit((12,), 17, base={"name": "lm-tiny"}, exits=[0])
    x = torch.randint(0, 17, (3, 12))
    lm.eval()
    assert lm(x).shape == (3, 12, 17)
    assert 0 < float(lm.costs[0]) < 1 and float(lm.costs[-1]) == 1.0
    cnn = early_exit((1, 8, 8), K)
    assert cnn.exit_layers == [0, 1] and cnn.training
    assert all(m.running_mean.abs().sum() == 0 for m in cnn.modules() if isinstance(m, torch.nn.BatchNorm2d))
