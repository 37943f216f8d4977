"""Stitching: a model stitched to itself by least squares is itself, the family's ends are the
anchors, the fit recovers a linear map, and stitched models are copies."""

import pytest
import torch

from brickwork.models import cnn, mlp, vit
from brickwork.ops.stitch import StitchLayer, default_cuts, family, fit_least_squares, stitched

pytestmark = pytest.mark.usefixtures("one_torch_thread")


X = torch.randn(96, 1, 8, 8)


@pytest.mark.parametrize(
    "build",
    [
        lambda: mlp((1, 8, 8), 4, width=12, depth=3),
        lambda: vit((1, 8, 8), 4, dim=8, depth=3, heads=2, patch=4),
        lambda: cnn((1, 8, 8), 4, channels=(3, 3, 3), norm="group"),
    ],
)
def test_a_model_stitched_to_itself_is_itself(build):
    torch.manual_seed(0)
    m = build().eval()
    for i in range(len(m.body) + 1):
        s, residual = stitched(m, m, i, i, X[:64])
        assert residual < 1e-4
        torch.testing.assert_close(s.eval()(X[64:]), m(X[64:]), atol=1e-4, rtol=1e-4)


def test_family_ends_are_the_anchors_and_stitches_sit_between():
    torch.manual_seed(0)
    small, large = mlp((1, 8, 8), 4, width=8, depth=2).eval(), mlp((1, 8, 8), 4, width=32, depth=4).eval()
    fam = family(small, large, X)
    assert [label for label, _, _ in fam] == ["front", "stitch 1:2", "back"]
    assert default_cuts(2, 4) == [(1, 2)]
    torch.testing.assert_close(fam[0][1](X), small(X))
    torch.testing.assert_close(fam[-1][1](X), large(X))
    s = fam[1][1].eval()
    assert [type(m).__name__ for m in s.body.layers] == ["DenseLayer", "StitchLayer", "DenseLayer", "DenseLayer"]
    with torch.no_grad():
        for p in s.parameters():
            p.add_(1.0)
    torch.testing.assert_close(fam[0][1](X), small(X))  # the stitched model holds copies


def test_least_squares_recovers_a_linear_map_on_feature_dims():
    torch.manual_seed(0)
    a, b = torch.randn(5, 3), torch.randn(5)
    h = torch.randn(20, 4, 3, 6, 6)[:, 0]  # (B, C=3, H, W)
    target = torch.einsum("oc,bchw->bohw", a, h) + b.view(1, 5, 1, 1)
    layer = StitchLayer(3, 5)
    assert fit_least_squares(layer, h, target) < 1e-6
    torch.testing.assert_close(layer.proj.weight, a, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer(h), target, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="differ"):
        fit_least_squares(layer, h, target[:, :, :3])
