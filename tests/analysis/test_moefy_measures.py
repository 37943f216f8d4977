"""Measurement helpers the moefy stages call: outputs, accuracy, fired neurons, specialisation
rows, and Matryoshka prefix accuracy, each checked against a computation written out by hand."""

import torch
from torch import nn

from brickwork.analysis.embedding_eval import encoder_outputs, output_accuracy
from brickwork.analysis.matryoshka import matryoshka_accuracy
from brickwork.analysis.modularity import fired_neurons, specialisation_rows
from brickwork.data.base import Split
from brickwork.models.nested import nested_mlp
from brickwork.nn import FeedForward
from brickwork.nn.nested import prefix


def test_encoder_outputs_are_the_model_in_eval_mode_batch_by_batch():
    model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5)).train()
    x = torch.randn(10, 4)
    out = encoder_outputs(model, x, batch_size=3)
    assert not model.training
    with torch.no_grad():
        assert torch.equal(out, torch.cat([model(x[:3]), model(x[3:6]), model(x[6:9]), model(x[9:])]))


def test_output_accuracy_is_argmax_accuracy_on_logits():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.5], [0.2, 0.1]])
    assert output_accuracy(logits, torch.tensor([0, 1, 1, 1]), num_classes=2) == 0.5


def test_fired_neurons_are_positive_pre_activations():
    ffn = FeedForward(4, 6)
    x = torch.randn(5, 4)
    expected = (x @ ffn.up.weight.t() + ffn.up.bias) > 0
    assert torch.equal(fired_neurons(ffn, x), expected)


def test_specialisation_rows_in_layer_order():
    spec = {
        f"body.layers.{i}.ffn": {"fractions": torch.ones(2, 4), "js": float(i), "js_shuffled": i / 10}
        for i in (10, 2, 0)
    }
    assert specialisation_rows(spec) == [
        {"layer": 0, "js": 0.0, "js_shuffled": 0.0},
        {"layer": 2, "js": 2.0, "js_shuffled": 0.2},
        {"layer": 10, "js": 10.0, "js_shuffled": 1.0},
    ]


def test_matryoshka_accuracy_reads_prefixes_of_the_representation():
    torch.manual_seed(0)
    model = nested_mlp((1, 4, 4), 3, width=16, depth=1, widths=[1.0], matryoshka=[4, 8]).eval()
    data = Split(torch.randn(20, 1, 4, 4), torch.randint(0, 3, (20,)))
    rows = matryoshka_accuracy(model, data, batch_size=7)
    with torch.no_grad():
        h = model.hidden(data.x)
        for row in rows:
            hits = (model.head(prefix(h, row["size"])).argmax(-1) == data.y).sum()
            assert row["accuracy"] == int(hits) / 20
    assert [r["size"] for r in rows][:2] == [4, 8]
