"""Early exits by value: the prediction features and exit scores by hand, the joint_gates and
distill objectives recomputed in float64, record fractions, default costs and every refusal."""

import math

import pytest
import torch
import torch.nn.functional as F

from brickwork.models import mlp
from brickwork.nn import ClassifierHead
from brickwork.nn.exits import EarlyExit, ExitGate, ExitRecord, exit_distribution, prediction_features

W, K = 12, 5


def _model(objective: str = "weighted", policy: str = "confidence", **kw) -> EarlyExit:
    torch.manual_seed(0)
    base = mlp((1, 8, 8), K, width=W, depth=4)
    heads = {i: ClassifierHead(W, K) for i in (0, 2)}
    gated = policy == "gate" or objective == "joint_gates"
    gates = {i: ExitGate("prediction") for i in heads} if gated else None
    return EarlyExit(base, heads, gates=gates, objective=objective, policy=policy, **kw).double()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, K, (6,), generator=g)


def _features_by_hand(p: list[float]) -> list[float]:
    top = sorted(p, reverse=True)
    h = -sum(q * math.log(q) for q in p) / math.log(len(p))
    return [top[0], top[0] - top[1], 1.0 - h]


def test_prediction_features_by_hand_per_sample_and_averaged_over_positions() -> None:
    p1, p2 = [0.5, 0.3, 0.2], [0.1, 0.1, 0.8]
    logits = torch.tensor([p1, p2], dtype=torch.float64).log()
    # computed in float32 on purpose (the gates' input): float32 round-off
    want = torch.tensor([_features_by_hand(p1), _features_by_hand(p2)])
    torch.testing.assert_close(prediction_features(logits), want, rtol=0, atol=1e-6)
    seq = torch.stack([logits[0], logits[1]])[None]  # (1, T=2, K): one sample, two positions
    torch.testing.assert_close(prediction_features(seq), want.mean(0, keepdim=True), rtol=0, atol=1e-6)
    one_class = prediction_features(torch.tensor([[3.0], [-1.0]]))  # K = 1: certain, no margin to take
    torch.testing.assert_close(one_class, torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]))


@pytest.mark.parametrize("policy, column", [("confidence", 0), ("entropy", 2)])
def test_the_exit_score_is_the_policys_feature(policy: str, column: int) -> None:
    m = _model(policy=policy)
    logits = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]], dtype=torch.float64).log()
    torch.testing.assert_close(m.score(0, logits), prediction_features(logits)[:, column])
    gated = _model(policy="gate")
    assert gated.gates is not None
    torch.testing.assert_close(gated.score(2, logits), gated.gates["2"](logits))


def test_joint_gates_loss_is_the_weighted_loss_plus_the_expected_cost_aware_loss() -> None:
    m, (x, y) = _model("joint_gates", cost_weight=0.5, weights=[1.0, 2.0, 3.0]), _data()
    outs = m.all_exits(x)
    ce = torch.stack([F.cross_entropy(z, y, reduction="none") for z in outs], 1)  # (B, 3)
    weighted = (ce.mean(0) * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)).sum() / 6
    assert m.gates is not None
    q = exit_distribution([m.gates[str(i)](z) for i, z in zip(m.exit_layers, outs, strict=False)])
    costs = torch.tensor([0.25, 0.75, 1.0], dtype=torch.float64)  # default (layer + 1) / L, then 1
    torch.testing.assert_close(m.costs.double(), costs)
    expected = weighted + (q * (ce + 0.5 * costs)).sum(1).mean()
    torch.testing.assert_close(m.training_loss(x, y, F.cross_entropy), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("teacher", ["final", "next"])
def test_distill_is_ce_and_temperature_scaled_kl_towards_the_detached_teacher(teacher: str) -> None:
    a, t = 0.3, 2.0
    m, (x, y) = _model("distill", distill_weight=a, temperature=t, teacher=teacher, weights=[1.0, 2.0, 3.0]), _data()
    outs = m.all_exits(x)

    def kl(s: torch.Tensor, p: torch.Tensor) -> torch.Tensor:  # KL(p || s) at temperature t, per sample mean
        ps, pt = F.log_softmax(s / t, -1), F.softmax(p / t, -1)
        return (pt * (pt.log() - ps)).sum(-1).mean() * t * t

    teachers = [outs[2], outs[2]] if teacher == "final" else [outs[1], outs[2]]
    ce = [F.cross_entropy(z, y) for z in outs]
    terms = [(1 - a) * ce[k] + a * kl(outs[k], teachers[k]) for k in range(2)] + [ce[2]]
    expected = (terms[0] + 2 * terms[1] + 3 * terms[2]) / 6
    loss = m.training_loss(x, y, F.cross_entropy)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)


def test_the_record_gives_the_share_leaving_after_each_layer() -> None:
    rec = ExitRecord(torch.tensor([0, 3, 3, 2, 3, 0, 3, 3]), 4)
    assert rec.fractions() == {0: 0.25, 2: 0.125, 3: 0.625}
    m = _model().eval()
    m.threshold.fill_(0.0)  # every sample leaves at the first exit
    with torch.no_grad():
        m(_data()[0])
    assert m.record is not None and m.record.num_layers == 4 and m.record.fractions() == {0: 1.0}


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"exits": {1: 0, -3: 0}}, r"exit layers \[-3, 1\] must be distinct and before the last of 4"),
        ({"exits": {3: 0}}, r"exit layers \[3\] must be distinct and before the last of 4"),
        ({"weights": [1.0, 1.0]}, r"2 weights for 2 exits and the final head"),
        ({"costs": [0.5, 1.0]}, r"2 costs for 2 exits and the final head"),
        ({"phase_steps": 0}, r"phase_steps must be >= 1, got 0"),
        ({"threshold": 1.5}, r"threshold must be in \[0, 1\], got 1.5"),
        ({"threshold": -0.1}, r"threshold must be in \[0, 1\], got -0.1"),
        ({"objective": "joint_gates"}, r"need one gate per exit"),
        ({"objective": "depth_weighted", "weights": [1.0, 1.0, 1.0]}, r"sets the weights itself"),
    ],
    ids=["same-layer", "last-layer", "weights", "costs", "phase", "threshold-high", "threshold-low", "gates", "depth"],
)
def test_early_exit_refuses_inconsistent_settings(kw: dict, match: str) -> None:
    base = mlp((1, 8, 8), K, width=W, depth=4)
    layers = kw.pop("exits", {0: 0, 2: 0})
    with pytest.raises(ValueError, match=match):
        EarlyExit(base, {i: ClassifierHead(W, K) for i in layers}, **kw)


def test_edges_of_the_threshold_range_are_accepted_and_gates_must_cover_every_exit() -> None:
    base = mlp((1, 8, 8), K, width=W, depth=4)
    for th in (0.0, 1.0):
        assert float(EarlyExit(base, {0: ClassifierHead(W, K)}, threshold=th).threshold) == th
    with pytest.raises(ValueError, match="one gate per exit"):  # a gate missing for exit 2
        EarlyExit(base, {0: ClassifierHead(W, K), 2: ClassifierHead(W, K)}, gates={0: ExitGate()}, policy="gate")
    m = EarlyExit(base, {-2: ClassifierHead(W, K)}, phase_steps=1)  # negative: from the end
    assert m.exit_layers == [2] and list(m.exits) == ["2"] and m.weights == [1.0, 1.0]


def test_jei_refuses_gates_without_logits() -> None:
    class Const(torch.nn.Module):
        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return torch.full(z.shape[:1], 0.5, dtype=z.dtype)

    torch.manual_seed(0)
    base = mlp((1, 8, 8), K, width=W, depth=4)
    m = EarlyExit(base, {0: ClassifierHead(W, K)}, gates={0: Const()}, objective="jei", phase_steps=1).double()
    x, y = _data()
    m.training_loss(x, y, F.cross_entropy)  # heads phase: the gate's probabilities are enough
    with pytest.raises(TypeError, match="must be ExitGate"):
        m.training_loss(x, y, F.cross_entropy)  # gates phase: logits needed


def test_an_exit_gate_takes_dtype_and_its_feature_count() -> None:
    g = ExitGate("prediction", dtype=torch.float64)
    assert g.proj.weight.dtype == torch.float64 and g.proj.in_features == 3
    logits = torch.randn(4, K, dtype=torch.float64)
    want = torch.sigmoid(g.proj(prediction_features(logits).double()).squeeze(-1))
    torch.testing.assert_close(g(logits), want, rtol=1e-12, atol=0)


def test_jei_gate_loss_weights_each_gates_own_bce() -> None:
    # Gate logits that differ, so a loss that averaged the BCE before weighting would differ.
    from brickwork.nn.exits import jei_gate_loss

    logits = torch.tensor([[2.0, -1.0], [0.5, 0.0]], dtype=torch.float64)
    # targets [1, 2]: gate targets [[0, 1], [0, 0]]; one 1 among four, up-weighted by 3
    y, w = [[0, 1], [0, 0]], [[1, 3], [1, 1]]

    def bce(z: float, t: int) -> float:
        return math.log1p(math.exp(z)) - z * t

    want = sum(w[b][g] * bce(float(logits[b, g]), y[b][g]) for b in range(2) for g in range(2)) / 4
    assert float(jei_gate_loss(logits, torch.tensor([1, 2]))) == pytest.approx(want, rel=1e-12)


def _jei_by_hand(p: list[float]) -> list[float]:
    top = sorted(p, reverse=True) + [0.0]

    def h(q: list[float]) -> float:
        return -sum(v * math.log(v) for v in q if v > 0)

    sq = [v * v for v in p]
    return [top[0], h(p), top[0] - top[1] if len(p) > 1 else top[0], h([v / sum(sq) for v in sq])]


def test_jei_gate_features_by_hand_for_sequences_two_classes_and_one() -> None:
    from brickwork.nn.exits import jei_gate_features

    p1, p2 = [0.5, 0.3, 0.2], [0.1, 0.1, 0.8]
    seq = torch.tensor([[p1, p2]], dtype=torch.float64).log()  # (B=1, T=2, K=3)
    want = (torch.tensor(_jei_by_hand(p1)) + torch.tensor(_jei_by_hand(p2))) / 2
    torch.testing.assert_close(jei_gate_features(seq), want[None], rtol=0, atol=1e-6)  # float32 on purpose
    two = torch.tensor([[0.7, 0.3]], dtype=torch.float64).log()
    torch.testing.assert_close(jei_gate_features(two), torch.tensor([_jei_by_hand([0.7, 0.3])]), rtol=0, atol=1e-6)
    one = jei_gate_features(torch.tensor([[4.0], [-2.0]]))  # K = 1: certain
    torch.testing.assert_close(one, torch.tensor([[1.0, 0.0, 1.0, 0.0]] * 2), rtol=0, atol=1e-6)


def test_per_sample_losses_average_positions_of_sequence_outputs() -> None:
    m = _model()
    g = torch.Generator().manual_seed(3)
    outs = [torch.randn(2, 3, K, generator=g, dtype=torch.float64) for _ in range(3)]  # (B, T, K) each
    y = torch.randint(0, K, (2, 3), generator=g)
    got = m.per_sample_losses(outs, y)
    for j, z in enumerate(outs):
        nll = -z.log_softmax(-1).gather(-1, y[..., None])[..., 0]  # (B, T)
        torch.testing.assert_close(got[:, j], nll.mean(1), rtol=1e-12, atol=0)


def test_loss_weights_keep_float64_precision() -> None:
    # Weights that float32 cannot hold exactly (1/3): the weighted objective is exact in float64.
    m, (x, y) = _model(weights=[1 / 3, 2 / 3, 1.0]), _data()
    ce = torch.stack([F.cross_entropy(z, y) for z in m.all_exits(x)])
    w = torch.tensor([1 / 3, 2 / 3, 1.0], dtype=torch.float64)
    torch.testing.assert_close(m.training_loss(x, y, F.cross_entropy), (w * ce).sum() / w.sum(), rtol=1e-14, atol=0)


def test_train_mode_is_the_full_model_and_threshold_one_runs_no_exit() -> None:
    from brickwork.analysis.compute import FlopMeter

    m, (x, _) = _model(), _data()
    torch.testing.assert_close(m.train()(x), m.head(m.body(m.stem(x))), rtol=0, atol=0)
    m.eval().threshold.fill_(1.0)
    with torch.no_grad():
        with FlopMeter() as exiting:
            m(x)
        with FlopMeter() as plain:
            m.head(m.body(m.stem(x)))
    assert exiting.total == plain.total  # nobody can leave at 1.0, so the exit heads cost nothing
