"""Every distillation loss against a hand computation (plain Python loops over float64 numbers, 1e-10)."""

from __future__ import annotations

import math

import pytest
import torch

from brickwork.errors import BrickworkError
from brickwork.registry import REGISTRY
from brickwork.train.distill import (
    Term,
    attention_transfer,
    dist_kd,
    hint,
    kd_divergence,
    logit_kd,
    relational_kd,
    rkd_angle,
    rkd_distance,
)

TOL = 1e-10


def _softmax(row: list[float], tau: float = 1.0) -> list[float]:
    m = max(v / tau for v in row)
    e = [math.exp(v / tau - m) for v in row]
    return [v / sum(e) for v in e]


def _huber(a: float, b: float) -> float:
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


def _gen(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2


def test_logit_kd_is_alpha_ce_plus_beta_tau2_kl_batchmean() -> None:
    s, t, y = _gen(3, 4, seed=1), _gen(3, 4, seed=2), torch.tensor([0, 3, 1])
    tau, alpha, beta = 3.0, 0.3, 0.7
    ce = kl = 0.0
    for i in range(3):
        ps = _softmax(s[i].tolist())
        ce -= math.log(ps[int(y[i])])
        qs, qt = _softmax(s[i].tolist(), tau), _softmax(t[i].tolist(), tau)
        kl += sum(pt * (math.log(pt) - math.log(q)) for pt, q in zip(qt, qs, strict=True))
    want = alpha * ce / 3 + beta * tau**2 * kl / 3
    assert abs(logit_kd(s, t, y, tau, alpha, beta).item() - want) < TOL
    assert abs(kd_divergence(s, t, tau).item() - tau**2 * kl / 3) < TOL
    # a language model's (B, T, V) logits: every position is a row of the batch mean
    s3, t3, y3 = s.reshape(1, 3, 4), t.reshape(1, 3, 4), y.reshape(1, 3)
    assert abs(logit_kd(s3, t3, y3, tau, alpha, beta).item() - want) < TOL


def test_logit_kd_refuses_another_output_space() -> None:
    with pytest.raises(
        BrickworkError,
        match=r"^logit KD: student outputs \(2, 10\) and teacher outputs \(2, 5\) are not the same output space; "
        r"logit distillation needs a teacher with the student's classes$",
    ):
        kd_divergence(_gen(2, 10), _gen(2, 5), 2.0)


def test_logit_kd_defaults_are_tau_4_and_equal_weights() -> None:
    s, t, y = _gen(3, 4, seed=15), _gen(3, 4, seed=16), torch.tensor([2, 0, 1])
    want = 0.5 * torch.nn.functional.cross_entropy(s, y) + 0.5 * kd_divergence(s, t, 4.0)
    assert abs(logit_kd(s, t, y).item() - want.item()) < TOL


def test_hint_is_mean_squared_error() -> None:
    s, t = _gen(2, 3, seed=3), _gen(2, 3, seed=4)
    want = sum((a - b) ** 2 for a, b in zip(s.flatten().tolist(), t.flatten().tolist(), strict=True)) / 6
    assert abs(hint(s, t).item() - want) < TOL
    with pytest.raises(BrickworkError, match=r"\(2, 3\).*\(2, 4\).*adapter"):
        hint(s, _gen(2, 4))
    with pytest.raises(BrickworkError, match=r"differ; set adapter: true on the term to learn a projection$"):
        hint(s, _gen(2, 4))


def _attention(fm: torch.Tensor) -> list[list[float]]:
    """Per sample: sum_c A_c^2 at each position, L2-normalised (the paper's F, p = 2)."""
    out = []
    for b in range(fm.shape[0]):
        e = [
            sum(fm[b, c, h, w].item() ** 2 for c in range(fm.shape[1]))
            for h in range(fm.shape[2])
            for w in range(fm.shape[3])
        ]
        n = math.sqrt(sum(v * v for v in e))
        out.append([v / n for v in e])
    return out


def test_attention_transfer_code_and_paper() -> None:
    s, t = _gen(2, 3, 2, 2, seed=5), _gen(2, 5, 2, 2, seed=6)  # channels may differ, positions not
    qs, qt = _attention(s), _attention(t)
    code = sum((a - b) ** 2 for rs, rt in zip(qs, qt, strict=True) for a, b in zip(rs, rt, strict=True)) / 8
    paper = (
        sum(math.sqrt(sum((a - b) ** 2 for a, b in zip(rs, rt, strict=True))) for rs, rt in zip(qs, qt, strict=True))
        / 2
    )
    assert abs(attention_transfer(s, t, "code").item() - code) < TOL
    assert abs(attention_transfer(s, t, "paper").item() - paper) < TOL
    # tokens (B, T, D): channels last, positions are tokens
    tok_s, tok_t = s.flatten(2).transpose(1, 2), t.flatten(2).transpose(1, 2)
    assert abs(attention_transfer(tok_s, tok_t).item() - code) < TOL
    with pytest.raises(BrickworkError, match="no spatial positions"):
        attention_transfer(_gen(2, 3), _gen(2, 3))


def _dist(e: torch.Tensor, i: int, j: int) -> float:
    return math.sqrt(sum((a - b) ** 2 for a, b in zip(e[i].tolist(), e[j].tolist(), strict=True)))


def test_rkd_distance_and_angle() -> None:
    s, t = _gen(4, 3, seed=7), _gen(4, 5, seed=8)
    n = 4

    def normalised(e: torch.Tensor) -> list[list[float]]:
        d = [[_dist(e, i, j) if i != j else 0.0 for j in range(n)] for i in range(n)]
        mu = sum(d[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        return [[v / mu for v in row] for row in d]

    ds, dt = normalised(s), normalised(t)
    want_d = sum(_huber(ds[i][j], dt[i][j]) for i in range(n) for j in range(n)) / n**2
    assert abs(rkd_distance(s, t).item() - want_d) < 1e-9  # the code's pdist clamps at 1e-12 and sqrt
    # embeddings closer than 1 apart: the mean is over every pair i != j, the clamp only at 1e-12
    small_s, small_t = s / 20, t / 30
    ds, dt = normalised(small_s), normalised(small_t)
    assert max(_dist(e, i, j) for e in (small_s, small_t) for i in range(n) for j in range(n)) < 1
    want_small = sum(_huber(ds[i][j], dt[i][j]) for i in range(n) for j in range(n)) / n**2
    assert abs(rkd_distance(small_s, small_t).item() - want_small) < 1e-9

    def cos(e: torch.Tensor, a: int, b: int, c: int) -> float:
        # angle at a between e_b - e_a and e_c - e_a; zero where a difference is zero
        if b == a or c == a:
            return 0.0
        u = [p - q for p, q in zip(e[b].tolist(), e[a].tolist(), strict=True)]
        v = [p - q for p, q in zip(e[c].tolist(), e[a].tolist(), strict=True)]
        return sum(p * q for p, q in zip(u, v, strict=True)) / (
            math.sqrt(sum(p * p for p in u)) * math.sqrt(sum(q * q for q in v))
        )

    want_a = sum(_huber(cos(s, a, b, c), cos(t, a, b, c)) for a in range(n) for b in range(n) for c in range(n)) / n**3
    assert abs(rkd_angle(s, t).item() - want_a) < TOL
    assert abs(relational_kd(s, t, 25.0, 50.0).item() - (25 * want_d + 50 * want_a)) < 1e-8
    assert abs(relational_kd(s, t).item() - (25 * want_d + 50 * want_a)) < 1e-8  # the paper's lambdas by default


def test_pairwise_distances_stay_on_the_input_device_and_dtype() -> None:
    from brickwork.train.distill.losses import _pairwise_distances

    e = torch.empty(3, 2, device="meta", dtype=torch.float64)
    d = _pairwise_distances(e)
    assert d.device.type == "meta" and d.dtype == torch.float64 and d.shape == (3, 3)


def test_dist_inter_and_intra_class_correlation() -> None:
    s, t, tau = _gen(3, 4, seed=9), _gen(3, 4, seed=10), 2.0
    want = _dist_by_hand(s, t, tau, 0.5, 2.0)  # rows: inter-class; columns: intra-class
    assert abs(dist_kd(s, t, tau, inter=0.5, intra=2.0).item() - want) < TOL


def _dist_by_hand(s: torch.Tensor, t: torch.Tensor, tau: float, inter_w: float, intra_w: float) -> float:
    ys = [_softmax(r, tau) for r in s.tolist()]
    yt = [_softmax(r, tau) for r in t.tolist()]

    def pearson(a: list[float], b: list[float]) -> float:
        ma, mb = sum(a) / len(a), sum(b) / len(b)
        a2, b2 = [v - ma for v in a], [v - mb for v in b]
        num = sum(p * q for p, q in zip(a2, b2, strict=True))
        return num / (math.sqrt(sum(p * p for p in a2)) * math.sqrt(sum(q * q for q in b2)) + 1e-8)

    n, k = len(ys), len(ys[0])
    inter = 1 - sum(pearson(ys[i], yt[i]) for i in range(n)) / n
    intra = 1 - sum(pearson([r[c] for r in ys], [r[c] for r in yt]) for c in range(k)) / k
    return tau**2 * (inter_w * inter + intra_w * intra)


def test_dist_defaults_are_unit_temperature_and_weights_and_scale_by_tau_squared() -> None:
    s, t = _gen(3, 4, seed=13), _gen(3, 4, seed=14)
    assert abs(dist_kd(s, t).item() - _dist_by_hand(s, t, 1.0, 1.0, 1.0)) < TOL
    assert abs(dist_kd(s, t, 3.0).item() - _dist_by_hand(s, t, 3.0, 1.0, 1.0)) < TOL  # tau^2 = 9, not 2 tau
    # a language model's (B, T, V) logits: every position is a row
    assert abs(dist_kd(s.reshape(1, 3, 4), t.reshape(1, 3, 4)).item() - _dist_by_hand(s, t, 1.0, 1.0, 1.0)) < TOL


def test_refusals_name_the_loss_and_both_shapes() -> None:
    with pytest.raises(BrickworkError, match=r"^DIST: student outputs \(2, 10\) and teacher outputs \(2, 5\)"):
        dist_kd(_gen(2, 10), _gen(2, 5))
    with pytest.raises(
        BrickworkError,
        match=r"^attention transfer: student positions \(2, 3, 2, 2\) and teacher positions \(2, 3, 4, 4\) differ; "
        "tap layers of the same spatial size$",
    ):
        attention_transfer(_gen(2, 3, 2, 2), _gen(2, 3, 4, 4))
    with pytest.raises(
        BrickworkError, match=r"\(2, 3\) have no spatial positions; tap a \(B, C, H, W\) or \(B, T, D\) tensor$"
    ):
        attention_transfer(_gen(2, 3), _gen(2, 3))


def test_registered_terms_call_the_functions_with_their_arguments() -> None:
    s, t, y = _gen(3, 4, seed=11), _gen(3, 4, seed=12), torch.tensor([1, 2, 3])
    kd = Term(loss="logit_kd", args={"temperature": 2.0, "alpha": 0.25, "beta": 0.75}).build()
    assert abs(kd(s, t, y).item() - logit_kd(s, t, y, 2.0, 0.25, 0.75).item()) < TOL
    labels = Term(loss="labels").build()
    assert abs(labels(s, t, y).item() - logit_kd(s, t, y, 1.0, 1.0, 0.0).item()) < TOL
    rel = Term(loss="relational", args={"distance": 1.0, "angle": 0.0}).build()
    assert abs(rel(s, t, y).item() - rkd_distance(s, t).item()) < TOL
    names = set(REGISTRY.names("distill_loss"))
    assert {"labels", "logit_kd", "hint", "attention", "relational", "dist"} <= names


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ({"temprature": 2.0}, "unknown argument 'temprature'"),
        ({"temperature": -1.0}, "greater than 0"),
        ({"mode": "x"}, "unknown"),
    ],
)
def test_bad_term_arguments_are_refused(args: dict[str, object], match: str) -> None:
    with pytest.raises((ValueError, BrickworkError), match=match):
        Term(loss="logit_kd", args=args)  # type: ignore[arg-type]
