"""`brickwork bench expert-parallel`: its cost-model fit and prediction, and one tiny run on 2 ranks."""

from __future__ import annotations

import math

from brickwork.bench.expert_parallel import bench_one, fit_exchange, predict_tokens_per_s


def test_the_exchange_fit_recovers_a_planted_latency_and_bandwidth():
    rows = [{"sent_bytes": b, "exchange": 0.002 + b / 3e9} for b in (1e6, 4e6, 16e6)]
    fixed, bandwidth = fit_exchange(rows)
    assert math.isclose(fixed, 0.002, rel_tol=1e-9) and math.isclose(bandwidth, 3e9, rel_tol=1e-9)


def test_the_prediction_is_tokens_over_compute_plus_exchange():
    # 1000 tokens, D 4 (H 8), top-1, 2 ranks: 18*4*8*1000 FLOPs at 1 GFLOP/s, half of 4*1000*4*4 bytes at 1 GB/s
    compute, sent = 18 * 4 * 8 * 1000 / 1e9, 4 * 1000 * 4 * 4 * 0.5 / 1e9
    got = predict_tokens_per_s(1000, 4, 1, 2, gflops=1.0, fixed_s=0.001, bandwidth=1e9)
    assert math.isclose(got, 1000 / (compute + 0.001 + sent), rel_tol=1e-12)
    # one rank sends nothing; twice the imbalance doubles the compute term
    assert math.isclose(predict_tokens_per_s(1000, 4, 1, 1, 1.0, 0.0, 1e9, imbalance=2.0), 1000 / (2 * compute))


def test_one_tiny_configuration_runs_on_two_ranks():
    r = bench_one(2, tokens=64, dim=16, experts=4, top_k=2, repeats=1, warmup=0)
    assert r["ranks"] == 2 and r["ep"] > 0 and r["local"] > 0 and r["exchange"] > 0
    assert r["sent_bytes"] > 0 and r["imbalance"] >= 1.0
