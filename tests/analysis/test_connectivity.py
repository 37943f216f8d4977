"""Linear mode connectivity: exact values on constructed cases, the ends, batch-norm reset, errors."""

import copy

import pytest
import torch
from torch import nn

from brickwork.analysis import (
    LinearPath,
    evaluate_loss_accuracy,
    interpolate,
    linear_path,
    parameter_distance,
    path_alphas,
    plot_linear_paths,
    reset_batch_norm,
)
from brickwork.data.base import Split
from brickwork.errors import BrickworkError


def _split(n: int = 40, d: int = 5, k: int = 3, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randn(n, d, generator=g), torch.randint(0, k, (n,), generator=g))


def _mlp(seed: int, d: int = 5, h: int = 8, k: int = 3, bn: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(d, h)]
    if bn:
        layers.append(nn.BatchNorm1d(h))
    return nn.Sequential(*layers, nn.ReLU(), nn.Linear(h, k))


def test_alphas_include_both_ends():
    assert path_alphas(5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    with pytest.raises(BrickworkError, match="points must be >= 2"):
        path_alphas(1)


def test_two_identical_models_have_zero_barrier_and_equal_points():
    data = _split()
    a = _mlp(0)
    b = copy.deepcopy(a)
    p = linear_path(a, b, data, points=7)
    assert len(p.loss) == 7
    assert all(v == p.loss[0] for v in p.loss)  # lerp(a, a, t) == a exactly
    assert all(v == p.accuracy[0] for v in p.accuracy)
    assert p.loss_barrier == 0.0 and p.accuracy_barrier == 0.0


def test_ends_equal_the_models_own_evaluation():
    data = _split()
    a, b = _mlp(0), _mlp(1)
    p = linear_path(a, b, data, points=3, batch_size=16)
    assert (p.loss[0], p.accuracy[0]) == evaluate_loss_accuracy(a, data, 16)
    assert (p.loss[-1], p.accuracy[-1]) == evaluate_loss_accuracy(b, data, 16)
    # and against a hand-written evaluation
    with torch.no_grad():
        logits = a(data.x)
    assert p.loss[0] == pytest.approx(float(nn.functional.cross_entropy(logits, data.y)), rel=1e-6)
    assert p.accuracy[0] == int((logits.argmax(-1) == data.y).sum()) / len(data.y)


def test_a_model_and_itself_scaled_follow_the_hand_computed_path():
    """f(x) = W x and g = c W: the point at alpha is (1 + alpha (c - 1)) W, so its loss is
    mean(logsumexp(s z) - s z_y) with s = 1 + alpha (c - 1); accuracy never changes (s > 0)."""
    data = _split(n=60)
    torch.manual_seed(3)
    a = nn.Linear(5, 3, bias=False)
    b = copy.deepcopy(a)
    c = 3.0
    with torch.no_grad():
        b.weight.mul_(c)
    p = linear_path(a, b, data, points=5)
    z = (data.x @ a.weight.detach().T).double()
    expected = []
    for alpha in p.alphas:
        s = 1 + alpha * (c - 1)
        lse = torch.logsumexp(s * z, dim=1)
        expected.append(float((lse - s * z[torch.arange(len(z)), data.y]).mean()))
    assert p.loss == pytest.approx(expected, rel=1e-5)
    acc = float((z.argmax(1) == data.y).double().mean())
    assert p.accuracy == [acc] * 5
    assert p.accuracy_barrier == 0.0
    assert p.loss_barrier == pytest.approx(max(expected) - 0.5 * (expected[0] + expected[-1]), rel=1e-5)
    assert p.midpoint_accuracy == acc


def test_barrier_definitions_on_a_given_path():
    p = LinearPath([0.0, 0.5, 1.0], [0.2, 1.0, 0.4], [0.9, 0.5, 0.7])
    assert p.loss_barrier == pytest.approx(1.0 - 0.3)
    assert p.accuracy_barrier == pytest.approx(0.8 - 0.5)
    assert p.row("x")["loss_barrier"] == pytest.approx(0.7)


def test_interpolate_copies_and_mixes_every_float_tensor():
    a, b = _mlp(0, bn=True), _mlp(1, bn=True)
    before = copy.deepcopy(a.state_dict())
    m = interpolate(a, b, 0.25)
    for k, t in m.state_dict().items():
        if t.is_floating_point():
            assert torch.equal(t, torch.lerp(a.state_dict()[k], b.state_dict()[k], 0.25)), k
    assert all(torch.equal(t, before[k]) for k, t in a.state_dict().items())  # a untouched
    assert m is not a


def test_batch_norm_reset_recomputes_interior_statistics_only():
    data = _split()
    a, b = _mlp(0, bn=True), _mlp(1, bn=True)
    train = [torch.randn(16, 5, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    p = linear_path(a, b, data, points=3, reset_batches=train)
    assert p.bn_reset
    assert (p.loss[0], p.accuracy[0]) == evaluate_loss_accuracy(a, data)  # ends keep their own statistics
    mid = interpolate(a, b, 0.5)
    bn = mid[1]
    # cumulative averages (momentum None) over the 3 batches: their mean, and the mean of their unbiased variances
    hs = [mid[0](x).detach() for x in train]
    reset_batch_norm(mid, train)
    assert torch.allclose(bn.running_mean, torch.stack([h.mean(0) for h in hs]).mean(0), atol=1e-6)
    assert torch.allclose(bn.running_var, torch.stack([h.var(0) for h in hs]).mean(0), atol=1e-5)
    assert bn.momentum == 0.1 and mid.training and bn.training  # momentum and modes restored
    assert p.loss[1] == pytest.approx(evaluate_loss_accuracy(mid, data)[0], rel=1e-6)
    naive = linear_path(a, b, data, points=3)
    assert not naive.bn_reset and naive.loss[1] != p.loss[1]


def test_different_architectures_are_refused_with_one_message():
    data = _split()
    with pytest.raises(BrickworkError, match="'0.weight' is \\(8, 5\\).*\\(4, 5\\)"):
        linear_path(_mlp(0), _mlp(1, h=4), data)
    with pytest.raises(BrickworkError, match="different tensors"):
        linear_path(_mlp(0), _mlp(1, bn=True), data)


def test_plot_writes_one_figure(tmp_path):
    data = _split()
    a, b = _mlp(0), _mlp(1)
    paths = {"naive": linear_path(a, b, data, points=3), "same": linear_path(a, a, data, points=3)}
    out = plot_linear_paths(paths, tmp_path / "lmc.png", title="t")
    assert out.exists() and out.stat().st_size > 1000


def test_parameter_distance_is_the_flat_euclidean_norm():
    a = _mlp(0)
    b = copy.deepcopy(a)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.5)
    n = sum(p.numel() for p in a.parameters())
    assert parameter_distance(a, b) == pytest.approx(0.5 * n**0.5, rel=1e-6)  # float32 rounding of p + 0.5
    assert parameter_distance(a, a) == 0.0
