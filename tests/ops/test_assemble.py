"""Module-wise training in a meta model: dividing and assembling are exact, a hybrid trains only its
slot (gradients, updates and training FLOPs), the m2mKD loss is the hand-computed one, and bad
divisions or widths get one clear message."""

import copy
import random

import pytest
import torch
import torch.nn.functional as F

from brickwork.data.base import Split
from brickwork.models.cnn import cnn
from brickwork.models.mlp import mlp
from brickwork.models.moe import moe_lm, moe_mlp
from brickwork.models.transformers import transformer_lm, vit
from brickwork.nn.meta import ModuleDistillation
from brickwork.nn.routing import MoESettings
from brickwork.ops.assemble import (
    AssembleError,
    assemble,
    boundaries,
    divide,
    fit_module,
    fitted_modules,
    meta_hybrid,
    module_shapes,
    split_model,
)
from brickwork.train.assemble import Trainer, deep_model_assembling, logit_kd
from brickwork.train.budget import train_counted
from brickwork.train.losses import cross_entropy
from brickwork.train.recipe import TrainSettings


def random_model(kind: str, rng: random.Random):
    """A randomly sized brick model of ``kind`` in float64, and an input batch for it."""
    depth = rng.randint(1, 5)
    if kind == "mlp":
        return mlp((3, 4), 5, width=rng.randint(3, 9), depth=depth), torch.randn(4, 3, 4)
    if kind == "cnn":
        channels = tuple(rng.choice([4, 8]) for _ in range(rng.randint(1, 3)))
        return cnn((1, 8, 8), 4, channels=channels, blocks=rng.randint(1, 2)), torch.randn(3, 1, 8, 8)
    if kind == "vit":
        return vit((1, 8, 8), 6, dim=8, depth=depth, heads=2, patch=4), torch.randn(3, 1, 8, 8)
    if kind == "lm":
        return transformer_lm((7,), 11, dim=8, depth=depth, heads=2), torch.randint(0, 11, (3, 7))
    if kind == "moe_mlp":
        return moe_mlp(
            (6,), 3, width=8, depth=depth, hidden=4, num_experts=4, routing=MoESettings(top_k=2)
        ), torch.randn(5, 6)
    return moe_lm(
        (6,), 9, dim=8, depth=depth, heads=2, hidden=4, num_experts=4, routing=MoESettings(top_k=1)
    ), torch.randint(0, 9, (2, 6))


KINDS = ["mlp", "cnn", "vit", "lm", "moe_mlp", "moe_lm"]


@pytest.mark.parametrize("kind", KINDS)
def test_split_then_assemble_is_the_same_model(kind):
    rng = random.Random(KINDS.index(kind))
    for _ in range(3):
        model, x = random_model(kind, rng)
        model = model.double().eval()
        x = x.double() if x.is_floating_point() else x
        k = rng.randint(1, len(model.body))
        pieces = split_model(model, k)
        assert [len(p.body) for p in pieces] == [len(r) for r in divide(len(model.body), k)]
        rebuilt = assemble(pieces).eval()
        with torch.no_grad():
            want = model(x)
            assert (rebuilt(x) - want).abs().max() <= 1e-10
            # the model's own module in its own position of itself is the model again
            for i in range(k):
                assert (meta_hybrid(pieces, i, pieces[i]).eval()(x) - want).abs().max() <= 1e-10
        # copies: changing a piece leaves the model alone
        with torch.no_grad():
            next(pieces[0].parameters()).add_(1.0)
            assert (model(x) - want).abs().max() == 0


def test_divide_sizes_and_bad_counts():
    assert [len(r) for r in divide(7, 3)] == [3, 2, 2]
    assert [list(r) for r in divide(4, 4)] == [[0], [1], [2], [3]]
    with pytest.raises(AssembleError, match=r"^modules: cannot divide 3 body layers into 4 modules; expected 1 to 3$"):
        split_model(mlp((4,), 2, width=4, depth=3), 4)
    with pytest.raises(AssembleError, match="into 0 modules"):
        divide(3, 0)


def _mlp_pair(seed: int, depth: int = 3):
    torch.manual_seed(seed)
    target = mlp((5,), 4, width=6, depth=depth).double()
    meta = mlp((5,), 4, width=6, depth=3).double()
    return target, meta


@pytest.mark.parametrize("slot", [0, 1, 2])
def test_the_meta_model_is_frozen_and_only_the_slot_learns(slot):
    target, meta = _mlp_pair(slot, depth=6)
    pieces, meta_pieces = split_model(target, 3), split_model(meta, 3)
    h = meta_hybrid(meta_pieces, slot, pieces[slot])
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 4, (8,))
    F.cross_entropy(h(x), y).backward()
    for name, p in h.named_parameters():
        if name.startswith("slot."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name  # frozen: no gradient is even computed
    # an AdamW step with weight decay changes the slot and nothing of the meta model
    before = {k: v.clone() for k, v in h.state_dict().items()}
    torch.optim.AdamW(h.parameters(), lr=0.1, weight_decay=0.5).step()
    for k, v in h.state_dict().items():
        assert torch.equal(v, before[k]) != k.startswith("slot."), k
    # and the meta model the hybrid was built from is untouched (its pieces were copied)
    for p in meta_pieces:
        assert all(q.requires_grad for q in p.parameters())


def test_training_flops_count_no_weight_gradient_outside_the_slot():
    """A linear MLP hybrid, slot 1 of 3, width W, F inputs, K classes, per sample: forward
    2FW + 3*2W^2 + 2WK; backward: the head's and layer 2's input gradients (2WK + 2W^2) and the slot's
    weight gradient (2W^2); nothing for the frozen stem and layer 0 (nothing before the slot needs a
    gradient, so not even the slot's input gradient runs)."""
    F_in, W, K, N = 5, 6, 4, 12
    target, meta = _mlp_pair(0)
    h = meta_hybrid(split_model(meta, 3), 1, split_model(target, 3)[1])
    data = Split(torch.randn(N, F_in, dtype=torch.float64), torch.randint(0, K, (N,)))
    _, flops = train_counted(h, data, TrainSettings(epochs=1, batch_size=5), seed=0)
    per_sample = 2 * F_in * W + 6 * W * W + 2 * W * K + (2 * W * K + 2 * W * W) + 2 * W * W
    assert flops == N * per_sample


def test_m2mkd_module_loss_is_the_hand_computation():
    torch.manual_seed(3)
    teacher = mlp((5,), 4, width=6, depth=6).double()
    student = moe_mlp((5,), 4, width=6, depth=3, hidden=3, num_experts=4, routing=MoESettings(top_k=2)).double()
    meta = mlp((5,), 4, width=6, depth=3).double()
    alpha, tau = 0.3, 2.5
    slot = 1
    t_piece, s_piece = split_model(teacher, 3)[slot], split_model(student, 3)[slot]
    pair = ModuleDistillation(meta_hybrid(split_model(meta, 3), slot, s_piece), t_piece, logit_kd(tau), alpha)
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 4, (7,))
    got = pair.training_loss(x, y, cross_entropy())

    # by hand, from the original models' own modules: meta stem + meta layer 0, then the module
    # (student layer 1 / teacher layers 2-3), then meta layer 2 and the meta model's head
    h = meta.body.layers[0](meta.stem(x))
    s = meta.head(meta.body.layers[2](student.body.layers[1](h)))
    t = meta.head(meta.body.layers[2](teacher.body.layers[3](teacher.body.layers[2](h))))
    log_ps, log_pt = (s / tau).log_softmax(-1), (t / tau).log_softmax(-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum() / len(x) * tau**2
    ce = -s.log_softmax(-1)[torch.arange(len(y)), y].mean()
    want = (1 - alpha) * ce + alpha * kl
    assert abs(got.item() - want.item()) <= 1e-10
    got.backward()  # the teacher and the meta model get no gradient; the student module does
    assert all(p.grad is None for p in teacher.parameters()) and all(p.grad is None for p in meta.parameters())
    assert all(p.grad is not None for p in s_piece.parameters())


def test_a_student_of_another_width_needs_an_adapter():
    torch.manual_seed(0)
    student = moe_lm((6,), 9, dim=12, depth=4, heads=2, hidden=4, num_experts=4)
    meta = transformer_lm((6,), 9, dim=8, depth=2, heads=2)
    x = torch.randint(0, 9, (2, 6))
    meta_shapes = boundaries(split_model(meta, 2), x)
    own = module_shapes(student, divide(4, 2), x)
    piece = split_model(student, 2)[0]
    msg = (
        r"^student module 0 \(body layers 0-1\) hands on per-sample shape \(6, 12\) but the meta model has "
        r"\(6, 8\) at position 0; "
        r"set adapters: true for learned stitch layers \(m2mKD\) or match the widths$"
    )
    with pytest.raises(AssembleError, match=msg):
        fit_module(piece, 0, meta_shapes, own[0], adapters=False, what="student module 0 (body layers 0-1)")
    second = split_model(student, 2)[1]
    adapted = fit_module(second, 1, meta_shapes, own[1], adapters=True, what="student module 1")
    out = meta_hybrid(split_model(meta, 2), 1, adapted)(x)
    assert out.shape == (2, 6, 9)
    assert adapted.body.layers[1] is second.body.layers[0]  # the stitch layers wrap the student's own layers
    # a teacher (or a target) must fit as it is: no stitch layers are offered
    wide_teacher = transformer_lm((6,), 9, dim=12, depth=2, heads=2)
    msg = r"^teacher module 0 \(body layers 0-0\) hands on per-sample shape \(6, 12\) .* meta model of its widths$"
    with pytest.raises(AssembleError, match=msg):
        fitted_modules(wide_teacher, meta, 2, x, adapters=None, role="teacher")
    # a teacher of the meta model's width fits as it is
    teacher = transformer_lm((6,), 9, dim=8, depth=4, heads=2)
    t_piece = split_model(teacher, 2)[1]
    assert (
        fit_module(t_piece, 1, meta_shapes, module_shapes(teacher, divide(4, 2), x)[1], adapters=False, what="t")
        is t_piece
    )


def test_assemble_refuses_pieces_out_of_order():
    pieces = split_model(mlp((4,), 2, width=4, depth=2), 2)
    with pytest.raises(AssembleError, match="piece 0 of 2 has no stem and a head"):
        assemble(list(reversed(copy.deepcopy(pieces))))


def test_deep_model_assembling_copies_and_counts_every_phase():
    target, meta = _mlp_pair(1, depth=4)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    data = Split(torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 4, (16,)))
    trainer = Trainer(data, Split(data.x[:0], data.y[:0]), seed=0)
    settings = TrainSettings(epochs=1, batch_size=8)
    out = deep_model_assembling(target, meta, 2, trainer, settings, meta_epochs=0, module_epochs=1, finetune_epochs=1)
    assert [p.name for p in out.phases] == ["module 0 (MT)", "module 1 (MT)", "assembled (FT)"]  # no PT at 0 epochs
    assert out.train_flops == sum(p.flops for p in out.phases) > 0
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())  # the target is not changed
    assert any(not torch.equal(v, before[k]) for k, v in out.model.state_dict().items())
