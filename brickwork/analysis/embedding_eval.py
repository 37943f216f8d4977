"""Quality and cost of a sentence encoder on real evaluation sets.

Quality, each against the original model where one is given:

* **fidelity**: mean cosine similarity between the encoder's sentence embeddings and the
  reference encoder's, sentence by sentence (1.0 = the same function on this text);
* **sentiment accuracy**: 5-fold cross-validated logistic regression on frozen embeddings of
  Rotten Tomatoes snippets (fresh vs rotten), the linear-probe protocol of SentEval
  (Conneau & Kiela, 2018);
* **WordSim-353**: Spearman correlation between the cosine of the two words' embeddings and the
  human relatedness score (Finkelstein et al., 2002).

Cost: FFN FLOPs per sentence counted at the dispatcher (:func:`~brickwork.analysis.compute.measure_compute`,
attributed to the FFN / MoE modules by path, so unchosen experts cost nothing), and measured
encode time per sentence (median of interleaved repeats, :func:`brickwork.analysis.timing.interleaved`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from brickwork.analysis.compute import measure_compute
from brickwork.analysis.timing import interleaved

#: Module paths of the FFNs (dense or MoEfied) of a stack model's body.
FFN_PATHS = r"body\.layers\.\d+\.ffn"

Encoder = Callable[[list[str]], Tensor]


@dataclass
class EvalSets:
    """Texts an encoder is measured on.

    Attributes:
        texts: sentences for the linear probe and the fidelity measure.
        labels: (N,) int class of every sentence.
        words: distinct words of the word-similarity pairs.
        pairs: (P, 2) indices into ``words``.
        human: (P,) human similarity scores.
    """

    texts: list[str]
    labels: np.ndarray
    words: list[str]
    pairs: np.ndarray
    human: np.ndarray

    @classmethod
    def build(cls, texts: list[str], labels: Iterable[int], word_pairs: Iterable[tuple[str, str, float]]) -> EvalSets:
        pairs = list(word_pairs)
        words = sorted({w for a, b, _ in pairs for w in (a, b)})
        index = {w: i for i, w in enumerate(words)}
        return cls(
            list(texts),
            np.asarray(list(labels)),
            words,
            np.array([(index[a], index[b]) for a, b, _ in pairs]),
            np.array([s for _, _, s in pairs]),
        )


@dataclass
class Embeddings:
    """An encoder's outputs on :class:`EvalSets`: sentences (N, D) and words (W, D)."""

    sentences: Tensor
    words: Tensor


def embed(encoder: Encoder, sets: EvalSets) -> Embeddings:
    """Run ``encoder`` (list of texts -> (N, D) tensor) on the sentences and the words."""
    return Embeddings(encoder(sets.texts), encoder(sets.words))


def probe_accuracy(x: Tensor | np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0) -> tuple[float, float]:
    """Mean and standard deviation over ``folds`` stratified folds of logistic-regression accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    feats = x.detach().cpu().numpy() if isinstance(x, Tensor) else x
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    scores = cross_val_score(LogisticRegression(max_iter=2000), feats, y, cv=cv)
    return float(scores.mean()), float(scores.std())


def wordsim_spearman(words: Tensor, pairs: np.ndarray, human: np.ndarray) -> float:
    """Spearman correlation of pair cosines of ``words`` (W, D) with the human scores."""
    from scipy.stats import spearmanr

    a, b = words[torch.from_numpy(pairs[:, 0])], words[torch.from_numpy(pairs[:, 1])]
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).numpy()
    return float(spearmanr(cos, human).statistic)


def fidelity(reference: Tensor, other: Tensor) -> float:
    """Mean row-wise cosine similarity of two (N, D) embedding matrices."""
    return float(torch.nn.functional.cosine_similarity(reference.double(), other.double(), dim=-1).mean())


def quality(emb: Embeddings, sets: EvalSets, reference: Embeddings | None = None) -> dict[str, float]:
    """``accuracy`` (+ ``accuracy_std`` over folds), ``wordsim`` and, against ``reference``,
    ``fidelity`` (sentences) and ``fidelity_words``."""
    acc, acc_std = probe_accuracy(emb.sentences, sets.labels)
    out = {"accuracy": acc, "accuracy_std": acc_std, "wordsim": wordsim_spearman(emb.words, sets.pairs, sets.human)}
    if reference is not None:
        out["fidelity"] = fidelity(reference.sentences, emb.sentences)
        out["fidelity_words"] = fidelity(reference.words, emb.words)
    return out


def module_flops(model: nn.Module, batches: Iterable[Tensor], pattern: str = FFN_PATHS) -> dict[str, float]:
    """FLOPs per sample, in total and in the modules whose path fully matches ``pattern``.

    Args:
        model: the encoder, (B, T) token ids -> embeddings.
        batches: (B, T) token id batches.
        pattern: regex over module paths (default the body's FFNs).

    Returns:
        ``{"flops": total per sample, "ffn_flops": per sample in the matching modules}``
        (their sub-modules are not counted twice: only top-most matches are summed).
    """
    compute = measure_compute(model, batches)
    return {"flops": compute.flops_per_sample, "ffn_flops": compute.flops_in(pattern)}


def encode_seconds(encoders: Mapping[str, Callable[[], object]], repeats: int = 3) -> dict[str, float]:
    """Median seconds of one call of each zero-argument encode job, timed interleaved after warm-up."""
    return interleaved(encoders, repeats=repeats, warmup=1)


def plot_quality_vs_flops(
    rows: list[dict[str, Any]],
    path: str,
    *,
    group: str = "series",
    metrics: tuple[tuple[str, str], ...] = (
        ("fidelity", "fidelity (cosine to dense)"),
        ("accuracy", "sentiment probe accuracy"),
        ("wordsim", "WordSim-353 Spearman"),
    ),
) -> str:
    """One panel per quality metric against FFN FLOPs per sentence, one line per ``row[group]``;
    rows with ``group`` = ``"dense"`` are drawn as a horizontal reference line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5 * len(metrics), 4.2))
    FigureCanvasAgg(fig)
    series = list(dict.fromkeys(r[group] for r in rows))
    for j, (key, label) in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), j + 1)
        for s in series:
            pts = sorted((r["ffn_flops"], r[key]) for r in rows if r[group] == s and key in r)
            if not pts:
                continue
            if s == "dense":
                ax.axhline(pts[0][1], color="black", ls="--", lw=1, label="dense")
                ax.plot([pts[0][0]], [pts[0][1]], "k*", ms=9)
            else:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=4, label=s)
        ax.set(xlabel="FFN FLOPs per sentence", ylabel=label, title=label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return str(out)


@torch.no_grad()
def encoder_outputs(model: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    """(N, ...) outputs of ``model`` in evaluation mode on ``x`` (N, ...), in batches of ``batch_size``.

    The model is left in evaluation mode (the moefy stage measures a converted copy it keeps).
    """
    model.eval()
    return torch.cat([model(b) for b in x.split(batch_size)])


def output_accuracy(out: Tensor, y: Tensor, num_classes: int) -> float:
    """Accuracy of outputs ``out`` (N, ...) against labels ``y`` (N,).

    Argmax accuracy when ``out`` is (N, num_classes) class logits; otherwise the outputs are
    features and the accuracy is that of the 5-fold logistic-regression probe on them.
    """
    if out.dim() == 2 and out.shape[1] == num_classes:
        return float((out.argmax(-1) == y).float().mean())
    return probe_accuracy(out.flatten(1), y.numpy())[0]
