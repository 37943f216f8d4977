"""One compute accounting: every former caller's figures on the reference models, and hand counts.

The numbers in ``OLD`` were produced by the code this family replaced (``measure_compute``,
``module_flops``, the depth stage's ``layer_costs``, the exits stage's ``piece_flops``,
``path_costs`` and ``truncated_cost``, and the nested benchmark's per-width count) on the same
models and inputs; they depend only on shapes. Each is also derived by hand where that is short:
2 FLOPs per multiply-accumulate, a Linear costs 2 x in x out per row, a 3x3 convolution
2 x H_out x W_out x C_out x C_in x 9, a MoE runs its router on every token and only the top-k
experts, and a sample that left at an exit costs nothing in later layers.
"""

import pytest
import torch

from brickwork.analysis.compute import (
    accuracy_and_flops,
    count_params,
    measure_compute,
    stack_flops,
    subnet_flops,
)
from brickwork.analysis.embedding_eval import module_flops
from brickwork.analysis.exits import exit_outputs, exit_scores, path_costs, simulate
from brickwork.data.base import Split
from brickwork.data.batching import batches
from brickwork.models import cnn, mlp, transformer_lm
from brickwork.models.moe import moe_lm, moe_mlp
from brickwork.models.nested import early_exit, nested_mlp
from brickwork.ops.slice import slice_model

# Figures of the replaced code (per sample), on the models built below.
OLD = {
    "mlp": {"flops": 10880.0, "layers": [2048.0, 2048.0, 2048.0], "stem": 4096.0, "head": 640.0},
    "cnn": {"flops": 11680.0, "layers": [4608.0, 2304.0], "stem": 4608.0, "head": 160.0},
    "lm": {"flops": 172416.0, "layers": [82944.0, 82944.0], "ffn": 98304.0},
    "moe": {"flops": 6720.0, "layers": [2176.0, 2176.0], "ffn": 4352.0},
    "moe_lm": {"flops": 470400.0, "layers": [231936.0, 231936.0], "ffn": 396288.0},
}
OLD_EXIT_PIECES = {
    "stem": 18432.0,
    "layer0": 18432.0,
    "exit0": 4648.0,
    "gate0": 6.0,
    "layer1": 9216.0,
    "exit1": 2344.0,
    "gate1": 6.0,
    "layer2": 4608.0,
    "head": 80.0,
}
OLD_PATHS = {"confidence": [41512.0, 53072.0, 57760.0], "gate": [41518.0, 53084.0, 57772.0]}
OLD_TRUNCATED = [41512.0, 48424.0, 50768.0]
OLD_NESTED = {0.25: 4736 / 8, 0.5: 13568 / 8, 1.0: 43520 / 8}


def reference(name):
    torch.manual_seed(0)
    return {
        "mlp": lambda: (mlp((1, 8, 8), 10, width=32, depth=3), torch.randn(4, 1, 8, 8)),
        "cnn": lambda: (cnn((1, 8, 8), 10, channels=(4, 8), blocks=1), torch.randn(2, 1, 8, 8)),
        "lm": lambda: (transformer_lm((12,), 17, dim=16, depth=2, heads=2), torch.randint(0, 17, (3, 12))),
        "moe": lambda: (moe_mlp((1, 8, 8), 10, width=16, depth=2, hidden=16, num_experts=4), torch.randn(5, 1, 8, 8)),
        "moe_lm": lambda: (moe_lm((12,), 17, dim=16, depth=2, heads=2, num_experts=4), torch.randint(0, 17, (3, 12))),
    }[name]()


def transformer_layer(t, d, hidden):
    """QKV and output projections, the two attention products (the CPU kernel's formula), the FFN."""
    return 2 * t * d * 3 * d + 2 * t * d * d + 2 * 2 * t * t * d + 2 * 2 * t * d * hidden


# Per sample, by hand (top-2 of 4 experts, router on every token: 2 x 16 x 4 per token).
HAND = {
    "mlp": 2 * (64 * 32 + 3 * 32 * 32 + 32 * 10),
    "cnn": 2 * 8 * 8 * 4 * 1 * 9 + 2 * 4 * 4 * 4 * 4 * 9 + 2 * 2 * 2 * 8 * 4 * 9 + 2 * 8 * 10,
    "lm": 2 * transformer_layer(12, 16, 64) + 12 * 2 * 16 * 17,
    "moe": 2 * 64 * 16 + 2 * (2 * 16 * 4 + 2 * (2 * 16 * 16 * 2)) + 2 * 16 * 10,
}


@pytest.mark.parametrize("name", list(OLD))
def test_whole_model_and_layers_as_the_old_code_counted(name):
    model, x = reference(name)
    compute = measure_compute(model, [x, x[:2]])
    assert compute.flops_per_sample == OLD[name]["flops"]
    assert compute.samples == len(x) + 2 and compute.params == count_params(model)
    assert stack_flops(model, x).layers == OLD[name]["layers"]
    layers = [compute.by_module[f"body.layers.{i}"] for i in range(len(model.body))]
    assert layers == OLD[name]["layers"]  # per module path, the same figure as per piece
    if name in HAND:
        assert compute.flops_per_sample == HAND[name]
    if "ffn" in OLD[name]:
        assert module_flops(model, [x, x[:2]]) == {"flops": OLD[name]["flops"], "ffn_flops": OLD[name]["ffn"]}


def test_pieces_of_a_plain_stack_by_hand():
    model, x = reference("mlp")
    pieces = stack_flops(model, x)
    assert (pieces.stem, pieces.head) == (OLD["mlp"]["stem"], OLD["mlp"]["head"]) == (2 * 64 * 32, 2 * 32 * 10)
    assert pieces.full == HAND["mlp"]
    assert pieces.truncated(2) == pieces.full and pieces.exits == {} and pieces.gates == {}
    assert model.training  # measured in eval mode, the mode given back


def test_pattern_sums_only_top_most_matches():
    model, x = reference("moe")
    compute = measure_compute(model, [x])
    ffn = [compute.by_module[f"body.layers.{i}.ffn"] for i in range(2)]
    assert compute.flops_in(r"body\.layers\.\d+\.ffn") == sum(ffn) == 2 * (2 * 16 * 4 + 2 * 2 * 16 * 16 * 2)
    # A pattern matching a layer and its FFN counts the FFN once, inside its layer.
    assert compute.flops_in(r"body\.layers\.\d+(\.ffn)?") == sum(OLD["moe"]["layers"])


def early_cnn():
    torch.manual_seed(0)
    model = early_exit(
        (1, 16, 16),
        5,
        base={"name": "cnn", "channels": [4, 8, 8], "blocks": 1, "norm": "batch"},
        exits=[0, 1],
        exit_hidden=4,
        policy="gate",
    )
    torch.manual_seed(1)
    return model, Split(torch.randn(40, 1, 16, 16) * 3, torch.randint(0, 5, (40,)))


def test_exit_pieces_paths_and_truncated_costs_as_the_old_code_counted():
    model, split = early_cnn()
    pieces = stack_flops(model, split.x[:16])
    assert pieces.as_dict() == OLD_EXIT_PIECES
    assert list(pieces.as_dict()) == list(OLD_EXIT_PIECES)  # the order they run in (the sweep's JSON)
    assert pieces.gates[0] == 2 * 3 * 1  # a gate is Linear(3, 1) on the prediction's features
    assert pieces.exits[1] == 2 * 2 * 2 * 4 * 8 * 9 + 2 * 4 * 5  # stride-2 3x3 conv 8->4 at 2x2, then 4->5
    assert {p: path_costs(model, pieces, p) for p in OLD_PATHS} == OLD_PATHS
    assert [pieces.truncated(i) for i in (0, 1, 2)] == OLD_TRUNCATED


def test_early_exit_flops_in_one_pass_equal_the_priced_paths_of_the_samples():
    """An exited sample's later layers cost nothing: the dispatcher's count of the compacting
    forward is the mean, over samples, of the cost of the path each one took."""
    model, split = early_cnn()
    model.eval()
    outs = exit_outputs(model, split, 16, "cpu")
    scores = exit_scores(model, outs)
    model.threshold.fill_(float(scores[0].median()))
    acc, flops = accuracy_and_flops(model, batches(split.x, split.y, 16))
    where, hit = simulate(scores, outs, split.y, float(model.threshold))
    assert 0 < int((where == 0).sum()) < len(split)  # some leave at the first exit, some do not
    costs = torch.tensor(path_costs(model, stack_flops(model, split.x[:16]), model.policy), dtype=torch.float64)
    assert flops == pytest.approx(float(costs[where].mean()), rel=1e-12)
    assert acc == pytest.approx(float(hit.mean()), abs=1e-7)  # the simulation averages in float32
    model.threshold.fill_(1.0)
    assert accuracy_and_flops(model, batches(split.x, split.y, 16))[1] == stack_flops(model, split.x).full


def test_accuracy_is_per_token_for_sequences():
    model, _ = reference("lm")
    x, y = torch.randint(0, 17, (7, 12)), torch.randint(0, 17, (7, 12))
    acc, flops = accuracy_and_flops(model, batches(x, y, 4))
    with torch.no_grad():
        model.eval()
        expected = int((model(x).argmax(-1) == y).sum()) / y.numel()  # 84 tokens, not 7 sequences
    assert acc == expected and flops == OLD["lm"]["flops"]


@pytest.mark.parametrize(
    ("base", "old", "hand"),
    [
        # CNN: no operator the counter lacks, the old figures stand.
        ({"name": "cnn", "channels": [4, 8, 8], "blocks": 1}, [0.7258469462394714, 0.9096612334251404], None),
        # MoE (grouped-matmul experts): the old raw counter missed every expert, so the exits looked
        # almost as expensive as the full model (0.90, 0.95 instead of 0.50, 0.75).
        (
            {"name": "moe_mlp", "width": 16, "depth": 3, "hidden": 16, "num_experts": 4},
            [0.9012345671653748, 0.9506173133850098],
            [(2048 + 2176 + 160) / (2048 + 3 * 2176 + 160), (2048 + 2 * 2176 + 160) / (2048 + 3 * 2176 + 160)],
        ),
    ],
)
def test_exit_costs_of_the_builder_count_the_registered_formulas(base, old, hand):
    torch.manual_seed(0)
    model = early_exit((1, 8, 8), 5, base=base, exits=[0, 1])
    costs = model.costs.tolist()
    assert costs[-1] == 1.0
    if hand is None:
        assert costs[:2] == old
    else:
        assert costs[:2] == pytest.approx(hand, rel=1e-6) and costs[0] < old[0] - 0.3


def test_exit_costs_price_attention():
    """A transformer's exits: attention products (the CPU kernel's formula) are in the costs."""
    torch.manual_seed(0)
    model = early_exit((12,), 17, base={"name": "transformer_lm", "dim": 16, "depth": 3, "heads": 2}, exits=[0, 1])
    layer, head = transformer_layer(12, 16, 64), 12 * 2 * 16 * 17
    full = 3 * layer + head
    assert model.costs.tolist()[:2] == pytest.approx([(layer + head) / full, (2 * layer + head) / full], rel=1e-6)
    assert model.costs[0] < 0.3524  # the old raw counter's figure, attention left out


def test_subnetworks_cost_what_their_sliced_models_cost():
    torch.manual_seed(0)
    model = nested_mlp((16,), 5, width=32, depth=2)
    x = torch.randn(8, 16)
    widths = list(OLD_NESTED)
    got = subnet_flops(model, [x], [(w, None) for w in widths])
    assert got == {(w, None): OLD_NESTED[w] for w in widths}
    assert got[(0.5, None)] == 2 * (16 * 16 + 2 * 16 * 16 + 16 * 5)  # 16 of 32 units everywhere
    assert all(got[(w, None)] == measure_compute(slice_model(model, w), [x]).flops_per_sample for w in widths)
    assert model.width == 1.0  # the supernet's configuration is given back
    assert subnet_flops(model, [x])[(1.0, 2)] == OLD_NESTED[1.0]  # default: the trained sub-networks


def test_no_samples_is_an_error():
    with pytest.raises(ValueError, match="no samples"):
        measure_compute(torch.nn.Linear(2, 2), [])
