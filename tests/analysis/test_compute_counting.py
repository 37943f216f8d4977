"""The accounting's own pieces, directly: parameters (shared once, frozen on request), the counter's
module names, registered formulas (grouped matmul in its three forms, a user's custom op), and the
per-sample means of ``accuracy_and_flops`` on a batch of one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from brickwork.analysis.compute import FlopMeter, accuracy_and_flops, count_params, register_flops


def test_count_params_counts_a_shared_parameter_once_and_frozen_on_request() -> None:
    emb = nn.Embedding(10, 4)  # 40
    head = nn.Linear(4, 10)  # 40 + 10
    head.weight = emb.weight  # tied: 40 + 10 in all
    frozen = nn.Linear(4, 3)  # 12 + 3
    frozen.requires_grad_(False)
    model = nn.ModuleList([emb, head, frozen, nn.Linear(3, 2)])  # + 6 + 2
    assert count_params(model) == 40 + 10 + 15 + 8
    assert count_params(model, trainable_only=True) == 40 + 10 + 8
    assert count_params(nn.Identity()) == 0


def test_per_module_names_paths_from_the_root_without_the_global_entry() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 2)))
    meter = FlopMeter()
    with meter:
        model(torch.randn(5, 3))
    assert meter.total == 2 * 5 * 3 * 4 + 2 * 5 * 4 * 2
    assert meter.per_module() == {"": 200, "0": 120, "2": 80, "2.0": 80}


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm is not in this torch build")
def test_grouped_matmul_formula_in_each_form() -> None:
    """Distinct sizes in every dimension, so a formula that uses the wrong one cannot pass."""
    offs = torch.tensor([4, 12], dtype=torch.int32)  # two groups over 12 rows
    cases = [
        (torch.randn(12, 8), torch.randn(2, 8, 4), {"offs": offs}, 2 * 12 * 8 * 4),  # 2D x 3D (forward)
        (torch.randn(3, 4, 8), torch.randn(3, 8, 12), {}, 2 * 3 * 4 * 8 * 12),  # 3D x 3D (batched)
        (torch.randn(8, 12), torch.randn(12, 16), {"offs": offs}, 2 * 8 * 12 * 16),  # 2D x 2D (weight grad)
    ]
    for a, b, kwargs, expected in cases:
        meter = FlopMeter()
        with meter:
            torch._grouped_mm(a, b, **kwargs)
        assert meter.total == expected, (tuple(a.shape), tuple(b.shape))


def test_a_registered_formula_counts_a_custom_op() -> None:
    @torch.library.custom_op("brickwork_test::scaled_copy", mutates_args=())
    def scaled_copy(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    register_flops(torch.ops.brickwork_test.scaled_copy)(lambda x_shape, *a, **k: 7 * x_shape[0])
    meter = FlopMeter()
    with meter:
        torch.ops.brickwork_test.scaled_copy(torch.randn(5, 3))
    assert meter.total == 35


def test_accuracy_and_flops_on_one_sample_is_that_sample() -> None:
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]))
        model.bias.zero_()
    x, y = torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([0])
    assert accuracy_and_flops(model, [(x, y)]) == (1.0, 2 * 3 * 2)
    assert accuracy_and_flops(model, []) == (0.0, 0.0)
