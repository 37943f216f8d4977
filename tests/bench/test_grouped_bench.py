"""`brickwork bench grouped`: its candidates compute the same product (a benchmark of unequal
work would be meaningless), and the command prints its table."""

import pytest
import torch

from brickwork.bench.grouped import main, product_candidates


@pytest.mark.parametrize("kind", ["forward", "wgrad"])
def test_candidates_compute_the_same_product(kind):
    c = product_candidates(kind, experts=3, rows=4, k=8, m=12)
    out = {name: f() for name, f in c.items()}
    ref = out["grouped_mm"]
    for name in ("mm_out", "bmm"):
        torch.testing.assert_close(out[name].reshape(ref.shape), ref, msg=name)
    # The dense limit has the same FLOPs: all 12 rows against one (8, 12) matrix, or one (8, 12) gradient.
    assert out["dense"].shape == ((12, 12) if kind == "forward" else (8, 12))


def test_prints_a_ratio_table(capsys):
    before = torch.get_num_threads()
    try:
        assert (
            main(["--experts", "2", "--rows", "4", "--dim", "8", "--repeats", "1", "--threads", "1", "--in-process"])
            == 0
        )
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr().out
    assert "| wgrad up | 4 |" in out and "| forward down | 4 |" in out
