"""The sentence classifier used for fine-tuning, and fine-tuning itself on a toy encoder."""

import io
import sys

import pytest
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


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _finetuned_by_hand(enc, train, test, *, classes, epochs, batch_size, lr, head_lr, warmup, seed):
    """The documented recipe written out: a head on a copy, AdamW (weight decay 0.01) with the encoder
    at ``lr`` and the head at ``head_lr``, linear warm-up then cosine decay over every step."""
    import copy
    import math

    from brickwork.data.batching import batches, epoch_order

    torch.manual_seed(seed)
    model = SentenceClassifier(copy.deepcopy(enc), 6, classes)
    enc_p, head_p = list(model.encoder.parameters()), list(model.head.parameters())
    opt = torch.optim.AdamW([{"params": enc_p, "lr": lr}, {"params": head_p, "lr": head_lr}], weight_decay=0.01)
    per_epoch = math.ceil(len(train) / batch_size)
    total = epochs * per_epoch
    model.train()
    for epoch in range(epochs):
        for i, (x, y) in enumerate(batches(train.x, train.y, batch_size, order=epoch_order(len(train), seed, epoch))):
            step = epoch * per_epoch + i
            if step < warmup:
                factor = (step + 1) / warmup
            else:
                factor = 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
            opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = lr * factor, head_lr * factor
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        logits = model(test.x)
        return nn.functional.cross_entropy(logits, test.y).item(), (logits.argmax(-1) == test.y).float().mean().item()


def _data(n: int, classes: int) -> Split:
    x = torch.randint(1, 20, (n, 4), generator=torch.Generator().manual_seed(n))
    return Split(x, x[:, 0] % classes)


def test_finetune_classifier_defaults_are_the_documented_recipe():
    torch.manual_seed(0)
    enc, data = MeanEmbed(), _data(64, 2)
    got = finetune_classifier(enc, 6, data, data)
    loss, acc = _finetuned_by_hand(
        enc, data, data, classes=2, epochs=1, batch_size=16, lr=3e-5, head_lr=1e-3, warmup=20, seed=0
    )
    assert got["loss"] == pytest.approx(loss, rel=1e-6) and got["accuracy"] == pytest.approx(acc, abs=1e-12)
    assert got["steps"] == 4 and len(got["history"]) == 1 and got["history"][0]["epoch"] == 1


def test_finetune_classifier_warms_up_then_decays_each_group_from_its_own_rate(monkeypatch):
    torch.manual_seed(0)
    enc, train, test = MeanEmbed(), _data(70, 3), _data(24, 3)
    args = {"epochs": 2, "batch_size": 8, "lr": 1e-2, "head_lr": 5e-2, "seed": 1}
    tty = _Terminal()
    monkeypatch.setattr(sys, "stderr", tty)  # a terminal: still no progress bar from fine-tuning
    got = finetune_classifier(enc, 6, train, test, num_classes=3, warmup_steps=3, **args)
    loss, acc = _finetuned_by_hand(enc, train, test, classes=3, warmup=3, **args)
    assert got["loss"] == pytest.approx(loss, rel=1e-6) and got["accuracy"] == pytest.approx(acc, abs=1e-12)
    assert got["steps"] == 18 and type(got["steps"]) is int  # 2 epochs of ceil(70 / 8) = 9 batches
    assert [row["epoch"] for row in got["history"]] == [1, 2]
    assert tty.getvalue() == ""
