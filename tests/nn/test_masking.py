"""Padding masks shared through PaddingMask: padded positions change nothing."""

import torch

from brickwork.models.minilm import bert_encoder


def test_padding_does_not_change_embeddings():
    torch.manual_seed(0)
    model = bert_encoder(vocab_size=20, dim=8, depth=2, heads=2, hidden=16, max_len=16).eval()
    short = torch.tensor([[5, 6, 7]])
    padded = torch.tensor([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]])
    with torch.no_grad():
        alone = model(short)
        both = model(padded)
    torch.testing.assert_close(both[0:1], alone)
    assert model.stem.padding.mask is not None  # the stem wrote the mask the others read


def test_dropping_layers_keeps_the_mask_shared():
    from brickwork.ops.chain import drop_layers

    torch.manual_seed(0)
    model = drop_layers(bert_encoder(vocab_size=20, dim=8, depth=3, heads=2, hidden=16, max_len=16).eval(), [1])
    assert len(model.body) == 2
    with torch.no_grad():
        alone = model(torch.tensor([[5, 6, 7]]))
        both = model(torch.tensor([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]]))
    torch.testing.assert_close(both[0:1], alone)
