"""The sentence classifier used for fine-tuning, and fine-tuning itself on a toy encoder."""

import torch
from torch import nn

from brickwork.data.base import Split
from brickwork.nn.heads import SentenceClassifier
from brickwork.train.finetune import finetune_classifier


class MeanEmbed(nn.Module):
    """(B, T) ids -> (B, D) mean embedding over every position (padding included, on purpose)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 6)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.emb(ids).mean(1)


def test_sentence_classifier_cuts_padding_columns_only():
    torch.manual_seed(0)
    clf = SentenceClassifier(MeanEmbed(), 6, 3)
    ids = torch.tensor([[5, 6, 0, 0, 0], [7, 0, 0, 0, 0]])
    # Trailing all-padding columns are dropped: the same as encoding the 2-column batch.
    assert torch.equal(clf(ids), clf.head(clf.encoder(ids[:, :2])))
    assert not torch.equal(clf(ids), clf.head(clf.encoder(ids)))


def test_finetune_classifier_leaves_the_encoder_and_is_reproducible():
    torch.manual_seed(0)
    enc = MeanEmbed()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    x = torch.randint(1, 20, (32, 4))
    data = Split(x, (x[:, 0] > 10).long())
    a = finetune_classifier(enc, 6, data, data, epochs=2, batch_size=8, lr=1e-2, head_lr=1e-2, warmup_steps=0)
    b = finetune_classifier(enc, 6, data, data, epochs=2, batch_size=8, lr=1e-2, head_lr=1e-2, warmup_steps=0)
    assert all(torch.equal(v, enc.state_dict()[k]) for k, v in before.items())
    assert a["accuracy"] == b["accuracy"] and a["loss"] == b["loss"] and a["steps"] == 8
