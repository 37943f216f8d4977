"""A sliced sub-network equals the supernet at that width and depth, with genuinely smaller
tensors, and its weights load into the nested builder called with the sliced arguments."""

import pytest
import torch

from brickwork.experiment.config import validate_args
from brickwork.models import nested as builders
from brickwork.ops.slice import slice_error, slice_model
from brickwork.registry import REGISTRY

pytestmark = pytest.mark.usefixtures("one_torch_thread")


CASES = {
    "nested_mlp": ((1, 8, 8), {"width": 24, "depth": 3}, lambda: torch.randn(3, 1, 8, 8)),
    "nested_cnn": ((1, 8, 8), {"channels": [6, 12, 12]}, lambda: torch.randn(3, 1, 8, 8)),
    "nested_lm": ((10,), {"dim": 16, "heads": 4, "depth": 3}, lambda: torch.randint(0, 13, (3, 10))),
    "nested_vit": ((1, 8, 8), {"dim": 16, "heads": 4, "depth": 3, "patch": 4}, lambda: torch.randn(3, 1, 8, 8)),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("width, depth", [(0.5, 3), (0.25, 2), (1.0, 2), (0.75, 3)])
def test_slice_equals_supernet_and_rebuilds_from_sliced_args(name, width, depth):
    torch.manual_seed(0)
    in_shape, args, make_x = CASES[name]
    if name == "nested_cnn" and depth == 2:
        depth = 3 - 1  # layer 2's 12 channels equal the last layer's: depth 2 ends on it
    builder = getattr(builders, name)
    supernet = builder(in_shape, 13, **args)
    sliced = slice_model(supernet, width, depth)
    x = make_x()
    assert slice_error(supernet, sliced, x, width, depth) <= 1e-6
    assert sum(p.numel() for p in sliced.parameters()) < sum(p.numel() for p in supernet.parameters())
    # Copies, not views: changing the supernet leaves the slice alone.
    before = [p.clone() for p in sliced.parameters()]
    with torch.no_grad():
        for p in supernet.parameters():
            p.add_(1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, sliced.parameters(), strict=True))
    full_args = validate_args(REGISTRY.get("model", name), args, "m")
    rebuilt = builder(in_shape, 13, **builders.sliced_args(name, full_args, width, depth))
    rebuilt.load_state_dict(sliced.state_dict())  # strict: same names and shapes
    rebuilt.eval()
    sliced.eval()
    torch.testing.assert_close(rebuilt(x), sliced(x))


def test_slice_of_a_preset_and_bad_arguments():
    args = validate_args(REGISTRY.get("model", "nested-mlp-small"), {}, "m")
    assert builders.sliced_args("nested-mlp-small", args, 0.5, 2)["width"] == 128
    with pytest.raises(ValueError, match="not a nested model"):
        builders.sliced_args("mlp", {}, 0.5, 1)
    model = builders.nested_mlp((1, 8, 8), 3, width=8, depth=2)
    with pytest.raises(ValueError):
        slice_model(model, 0.5, 3)
