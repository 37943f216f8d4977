"""A dense sentence encoder as the reference every changed copy of it is measured against.

The MoEfication study compares many converted, pruned and fine-tuned copies of one encoder on
the same text. :func:`study_texts` draws that text once (Rotten Tomatoes snippets split by a
seed into calibration, evaluation and fine-tuning sentences, disjoint; WordSim-353 pairs), and
:class:`EncoderBench` holds the dense model's embeddings of it, so that :meth:`EncoderBench.measure`
gives each copy's row: quality (:func:`~brickwork.analysis.embedding_eval.quality`, fidelity to
the dense embeddings), FLOPs per sentence in total and in the FFNs, and one encode time.
Reads models; never changes them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from brickwork.analysis.embedding_eval import Embeddings, EvalSets, embed, module_flops, quality
from brickwork.data.batching import input_batches
from brickwork.data.sentences import rotten_tomatoes, wordsim353

#: ``encode(model, sentences)`` -> (N, D) sentence embeddings.
EncodeFn = Callable[[nn.Module, list[str]], Tensor]
#: ``tokenize(sentences)`` -> (N, T) int64 ids padded with 0.
TokenizeFn = Callable[[list[str]], Tensor]


@dataclass
class StudyTexts:
    """The study's sentences: calibration, evaluation (with WordSim-353) and fine-tuning, disjoint."""

    calib: list[str]
    sets: EvalSets
    finetune: list[str]
    finetune_labels: list[int]


def study_texts(seed: int, calib: int, evaluation: int, finetune: int) -> StudyTexts:
    """Rotten Tomatoes snippets shuffled once by ``seed``: the first ``calib`` for calibration,
    the next ``evaluation`` for measuring, the next ``finetune`` for fine-tuning."""
    texts, labels = rotten_tomatoes()
    perm = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    ev, ft = perm[calib : calib + evaluation], perm[calib + evaluation : calib + evaluation + finetune]
    sets = EvalSets.build([texts[i] for i in ev], [labels[i] for i in ev], wordsim353())
    return StudyTexts([texts[i] for i in perm[:calib]], sets, [texts[i] for i in ft], [labels[i] for i in ft])


@dataclass
class EncoderBench:
    """The dense encoder's embeddings of the evaluation sets, and the measurement of any copy.

    Attributes:
        encode: runs a model over sentences.
        sets: evaluation sentences and word pairs.
        eval_ids: (N, T) ids of the evaluation sentences.
        flop_batches: padding-free batches of the first 256 evaluation sentences, for FLOPs
            (and layer importance).
        reference: the dense model's embeddings.
        dense_row: the dense model's row (fidelity 1 by definition).
    """

    encode: EncodeFn
    sets: EvalSets
    eval_ids: Tensor
    flop_batches: list[Tensor]
    reference: Embeddings
    dense_row: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, dense: nn.Module, encode: EncodeFn, tokenize: TokenizeFn, sets: EvalSets) -> EncoderBench:
        """Embed the evaluation sets with ``dense`` and measure its row (``series`` = ``"dense"``)."""
        eval_ids = tokenize(sets.texts)
        flop_batches = list(input_batches(eval_ids, 64, padded=True, limit=256))
        t0 = time.perf_counter()
        ref = embed(lambda t: encode(dense, t), sets)
        bench = cls(encode, sets, eval_ids, flop_batches, ref)
        bench.dense_row = bench._row(dense, "dense", ref, time.perf_counter() - t0, series="dense")
        return bench

    def _row(self, model: nn.Module, label: str, emb: Embeddings, seconds: float, **extra: Any) -> dict[str, Any]:
        row = {
            "label": label,
            **quality(emb, self.sets, self.reference),
            **module_flops(model, self.flop_batches),
            "encode_s": seconds,
            **extra,
        }
        if self.dense_row:
            row["ffn_ratio"] = row["ffn_flops"] / self.dense_row["ffn_flops"]
        return row

    def measure(self, model: nn.Module, label: str, **extra: Any) -> dict[str, Any]:
        """The row of ``model``: ``label``, quality against the dense embeddings, ``flops`` and
        ``ffn_flops`` per sentence, ``ffn_ratio`` to the dense FFNs, ``encode_s`` (one pass),
        and ``extra``."""
        t0 = time.perf_counter()
        emb = embed(lambda t: self.encode(model, t), self.sets)
        return self._row(model, label, emb, time.perf_counter() - t0, **extra)
