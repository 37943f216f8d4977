"""The ``encoder_quality`` stage: a sentence encoder measured against a pretrained reference.

For distilling pretrained MiniLM into a smaller brickwork encoder (a MoEfied copy, top-k of its
experts per token) the pipeline is ``encoder_quality`` (the dense model's row), ``moefy`` (the MoE
student), ``encoder_quality`` (before distillation), ``distill`` with ``teacher: {pretrained:
minilm-l6}`` (the training), ``encoder_quality`` (after). Each call adds one row, measured on the
run's own held-out split of Rotten Tomatoes token ids (so the sentences distilled on, the train
split, are never measured) and WordSim-353:

* fidelity: mean cosine of the variant's sentence embeddings to the reference's;
* sentiment probe: 5-fold logistic regression on the frozen embeddings (SentEval protocol);
* WordSim-353 Spearman of the word embeddings' cosines with human scores;
* FLOPs per sentence in total and in the FFN / MoE modules (dispatcher count).

The measures are :mod:`brickwork.analysis.embedding_eval`'s; the stage only calls and records.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import numpy as np
from pydantic import Field

from brickwork.analysis.embedding_eval import (
    encoder_outputs,
    fidelity,
    module_flops,
    probe_accuracy,
    wordsim_spearman,
)
from brickwork.data.batching import input_batches
from brickwork.data.sentences import wordsim353
from brickwork.data.tokenizer import Tokenizer
from brickwork.errors import BrickworkError
from brickwork.experiment.context import SplitName, StageContext
from brickwork.experiment.report import markdown_table as table
from brickwork.registry import REGISTRY, register
from brickwork.train.distill.taps import frozen_teacher

_COLUMNS = [
    ("label", "encoder", "{}"),
    ("fidelity", "fidelity (cos to reference)", "{:.4f}"),
    ("accuracy", "sentiment probe", "{:.4f}"),
    ("wordsim", "WordSim-353", "{:.4f}"),
    ("ffn_flops", "FFN FLOPs/sentence", "{:,.0f}"),
    ("flops", "FLOPs/sentence", "{:,.0f}"),
]


@register("stage", "encoder_quality")
def encoder_quality(
    ctx: StageContext,
    /,
    label: str,
    reference: str = "minilm-l6",
    split: SplitName = "test",
    samples: Annotated[int, Field(ge=10)] = 1000,
    batch_size: Annotated[int, Field(ge=1)] = 64,
    wordsim: bool = True,
) -> None:
    """Measure this variant's sentence embeddings against the pretrained ``reference`` (one report row ``label``).

    Args:
        label: the row's name (``dense``, ``moe before distillation``, ...).
        reference: a registered pretrained encoder (the teacher).
        split: the held-out split of token ids measured on.
        samples: at most this many sentences of ``split``.
        batch_size: encoding batch size.
        wordsim: also measure WordSim-353 (437 words through the encoder).
    """
    if ctx.data.task != "classify" or ctx.data.train.x.dtype.is_floating_point:
        raise BrickworkError(f"encoder_quality: data {ctx.data.name!r} is not a labelled set of token ids")
    ref = frozen_teacher(REGISTRY.get("model", reference, path="encoder_quality.reference").obj().to(ctx.device))
    data = getattr(ctx.data, split)
    x, y = data.x[:samples].to(ctx.device), data.y[:samples].cpu().numpy()
    emb = encoder_outputs(ctx.model, x, batch_size).cpu()
    acc, acc_std = probe_accuracy(emb, y)
    row: dict[str, Any] = {
        "label": label,
        "fidelity": fidelity(encoder_outputs(ref, x, batch_size).cpu(), emb),
        "accuracy": acc,
        "accuracy_std": acc_std,
        **module_flops(ctx.model, input_batches(x, batch_size, padded=True, limit=256)),
    }
    pairs = wordsim353() if wordsim else []
    if pairs:
        words = sorted({w for a, b, _ in pairs for w in (a, b)})
        index = {w: i for i, w in enumerate(words)}
        word_emb = encoder_outputs(ctx.model, Tokenizer(x.shape[1])(words).to(ctx.device), batch_size).cpu()
        pair_idx = np.array([(index[a], index[b]) for a, b, _ in pairs])
        row["wordsim"] = wordsim_spearman(word_emb, pair_idx, np.array([s for _, _, s in pairs]))
    key = re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")  # "MoE student (k=4)" -> moe_student_k_4
    ctx.metrics.update({f"quality_{key}_{k}": v for k, v in row.items() if k not in ("label", "accuracy_std")})
    ctx.report.extend(
        [
            f"### Encoder quality: {label}",
            f"{len(x)} {split} sentences (never trained on), {len(pairs)} WordSim-353 pairs; fidelity is "
            f"the mean cosine to pretrained {reference}; the probe's ± is the spread over 5 folds.",
            table([row], _COLUMNS),
        ]
    )
