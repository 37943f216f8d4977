"""Auxiliary-loss weights: each loss defaults to its paper's weight, in the loop, the helper and `ls`."""

import pytest
import torch
from torch import nn

from brickwork.cli import main
from brickwork.nn import moe_ffn
from brickwork.nn.records import AUX_LOSS_DEFAULTS, aux_weight, collect_aux_losses, weighted_aux_loss
from brickwork.train.loop import train_step


def test_defaults_are_the_papers_weights() -> None:
    # Switch Transformer alpha, ST-MoE c_z, Shazeer et al.'s w_importance and w_load.
    papers = {"load_balance": 1e-2, "z_loss": 1e-3, "importance": 0.1, "load": 0.1}
    assert {k: AUX_LOSS_DEFAULTS[k].weight for k in papers} == papers
    assert aux_weight("z_loss") == 1e-3 and aux_weight("z_loss", {"z_loss": 0.5}) == 0.5
    assert aux_weight("z_loss", {"load_balance": 0.0}) == 1e-3  # a partial config keeps the others' defaults
    assert aux_weight("not_a_listed_loss") == 1.0  # never silently dropped


def _model() -> nn.Module:
    torch.manual_seed(0)
    return moe_ffn(6, 8, 4).double().train()


@pytest.mark.parametrize("weights", [None, {"z_loss": 0.5}])
def test_train_step_adds_each_loss_at_its_default_or_configured_weight(weights) -> None:
    x, y = torch.randn(2, 5, 6, dtype=torch.float64), torch.randn(2, 5, 6, dtype=torch.float64)
    model, ref = _model(), _model()

    def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (out - target).square().mean()

    # Reference gradient of the objective written out by hand with the papers' weights.
    ref.zero_grad()
    task = mse(ref(x), y)
    aux = collect_aux_losses(ref)
    wz = 0.5 if weights else 1e-3
    (task + 1e-2 * aux["load_balance"] + wz * aux["z_loss"]).backward()
    expected = {n: p.detach() - p.grad for n, p in ref.named_parameters()}

    train_step(model, x, y, mse, torch.optim.SGD(model.parameters(), lr=1.0), aux_weights=weights)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-10, atol=1e-12, msg=n)
    total = weighted_aux_loss(ref, weights or {})
    assert total is not None
    torch.testing.assert_close(total, 1e-2 * aux["load_balance"] + wz * aux["z_loss"], rtol=1e-12, atol=0)


def test_ls_shows_the_default_weights(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ls", "router"]) == 0
    out = capsys.readouterr().out
    section = out[out.index("aux_weights") :]
    for name, d in AUX_LOSS_DEFAULTS.items():
        assert f"{name:<22} {d.weight:g}" in section
