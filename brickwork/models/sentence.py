"""A pretrained sentence encoder with a linear classification head, trainable from a config.

:class:`brickwork.nn.heads.SentenceClassifier` is the same classifier for code that fine-tunes an
encoder it holds (``train/finetune.py``); this builder makes it a registered model, so that a
labelled set of token ids (``rotten-tomatoes``, the user's ``jsonl``) trains with the ordinary
``train`` / ``evaluate`` stages. It is built as a :class:`~brickwork.nn.StackModel` (the
encoder's stem and body, then its pooling followed by the linear head), the shape every
registered model has, so exits, taps, slicing and distillation see its layers as they see any
other model's.
"""

from __future__ import annotations

from typing import Annotated

import torch
from torch import nn

from brickwork.models.presets import DATA_ARGS
from brickwork.nn import StackModel
from brickwork.registry import REGISTRY, RegistryName, register


@register("model", "sentence_classifier", injected=DATA_ARGS)
def sentence_classifier(
    in_shape: tuple[int, ...],
    num_classes: int,
    encoder: Annotated[str, RegistryName("model")] = "minilm-l6",
) -> StackModel:
    """A pretrained sentence encoder (its weights loaded) followed by a linear classifier.

    Args:
        in_shape: (T,), token ids per sentence (from the dataset).
        num_classes: classes of the linear head (from the dataset).
        encoder: a registered pretrained encoder that takes no arguments and maps (B, T) ids to
            (B, D) sentence embeddings, e.g. ``minilm-l6``.

    Shapes:
        (B, T) int64 ids (0 = padding) -> (B, num_classes) logits
    """
    if len(in_shape) != 1:
        raise ValueError(f"sentence_classifier: expects token ids (T,), got input shape {tuple(in_shape)}")
    enc = REGISTRY.get("model", encoder).obj()
    if not isinstance(enc, StackModel):
        raise ValueError(f"sentence_classifier: encoder {encoder!r} is not a stack model (stem, body, head)")
    with torch.no_grad():  # the embedding size, read from one forward pass of two tokens
        dim = int(enc(torch.ones(1, 2, dtype=torch.long)).shape[-1])
    return StackModel(enc.stem, enc.body, nn.Sequential(enc.head, nn.Linear(dim, num_classes)))
