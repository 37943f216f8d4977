"""fused_glu: same values and gradients as the autograd GLU on a fused projection."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from brickwork.kernels import fused_glu


@pytest.mark.parametrize("act", ["silu", "gelu", "relu"])
def test_fused_glu_matches_autograd(act: str) -> None:
    z = torch.randn(5, 3, 8, dtype=torch.float64, requires_grad=True)
    fn = getattr(F, act)
    out = fused_glu(z, act, fn)
    a, b = z.chunk(2, dim=-1)
    ref = fn(a) * b
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(out, z, g)[0], torch.autograd.grad(ref, z, g)[0])
    if act != "relu":
        assert torch.autograd.gradcheck(lambda t: fused_glu(t, act), (z,))


def test_fused_glu_zero_stride_gradient() -> None:
    z = torch.randn(4, 6, requires_grad=True)
    fused_glu(z, "silu").sum().backward()
    a, b = z.detach().chunk(2, dim=-1)
    expected_b = F.silu(a)
    assert z.grad is not None
    torch.testing.assert_close(z.grad[:, 3:], expected_b)
