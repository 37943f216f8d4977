"""The ``moefy`` stage (FFNs into neuron experts, then fidelity and cost on the test split), and
sentence-classifier fine-tuning shared with the ``brickwork moefy`` verb.

The stage replaces ``ctx.model`` by the converted copy. It measures, on the test split, the
cosine similarity of the converted model's outputs to the dense model's, the accuracy of both
(argmax accuracy when the model outputs class logits; otherwise 5-fold logistic regression on
the outputs, i.e. a linear probe of a sentence encoder), and FLOPs per sample in total and in
the FFN / MoE modules (dispatcher count, so unchosen experts cost nothing).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Annotated, Any

import torch
from pydantic import Field
from torch import Tensor, nn

from brickwork.analysis.embedding_eval import module_flops, probe_accuracy
from brickwork.data.base import Split
from brickwork.data.sentences import token_batches
from brickwork.experiment.context import StageContext
from brickwork.experiment.report import markdown_table as table
from brickwork.experiment.stages.depth import stack_of
from brickwork.models import minilm as _minilm  # noqa: F401 - registers the model "minilm-l6" for configs
from brickwork.ops.moefy import Clustering, RouterKind, moefy
from brickwork.registry import register
from brickwork.train import FitConfig, build_loss, evaluate, fit


def model_batches(x: Tensor, batch_size: int) -> Iterator[Tensor]:
    """Batches of model inputs; token ids (int) are grouped by length so that no padding is seen."""
    if x.dtype == torch.long:
        yield from (b for b, _ in token_batches(x, batch_size))
    else:
        yield from x.split(batch_size)


@torch.no_grad()
def _outputs(model: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    model.eval()
    return torch.cat([model(b) for b in x.split(batch_size)])


def _accuracy(out: Tensor, y: Tensor, num_classes: int) -> float:
    if out.dim() == 2 and out.shape[1] == num_classes:
        return float((out.argmax(-1) == y).float().mean())
    return probe_accuracy(out.flatten(1), y.numpy())[0]


@register("stage", "moefy")
def moefy_stage(
    ctx: StageContext,
    /,
    experts: Annotated[int, Field(ge=1)] = 16,
    top_k: Annotated[int, Field(ge=1)] = 4,
    clustering: Clustering = "kmeans",
    router: RouterKind = "emoe",
    calib_samples: Annotated[int, Field(ge=1)] = 512,
    eval_samples: Annotated[int, Field(ge=10)] = 1000,
    batch_size: Annotated[int, Field(ge=1)] = 64,
    seed: int = 0,
) -> None:
    """Split every FFN into ``experts`` neuron groups computed ``top_k`` at a time (MoEfication /
    EMoE), calibrated on the train split; compare with the dense model on the test split."""
    dense = stack_of(ctx.model)
    calib = ctx.data.train.x[:calib_samples].to(ctx.device)
    conv, stats = moefy(dense, model_batches(calib, batch_size), num_experts=experts, top_k=top_k,
                        clustering=clustering, router=router, seed=seed)
    test = ctx.data.test
    x, y = test.x[:eval_samples].to(ctx.device), test.y[:eval_samples].cpu()
    ref, out = _outputs(dense, x, batch_size).cpu(), _outputs(conv, x, batch_size).cpu()
    fid = float(torch.nn.functional.cosine_similarity(ref.flatten(1).double(), out.flatten(1).double()).mean())
    rows = []
    for label, model, o in (("dense", dense, ref), (f"moefy E={experts} k={top_k}", conv, out)):
        cost = module_flops(model, model_batches(x[:256], batch_size))
        rows.append({"label": label, "accuracy": _accuracy(o, y, ctx.data.num_classes), **cost})
    recall = [s["recall"] for s in stats.values() if "recall" in s]
    ctx.model = conv
    ctx.structure.append({"op": "moefy", "experts": experts, "top_k": top_k, "router": router})
    ctx.metrics.update(moefy_fidelity=fid, moefy_accuracy=rows[1]["accuracy"], dense_accuracy=rows[0]["accuracy"],
                       moefy_ffn_flops_ratio=rows[1]["ffn_flops"] / rows[0]["ffn_flops"])
    if recall:
        ctx.metrics["moefy_router_recall"] = sum(recall) / len(recall)
    ctx.points.extend({"label": r["label"], "accuracy": r["accuracy"], "flops": r["flops"]} for r in rows)
    ctx.report.extend([
        f"### MoEfication ({clustering} clustering, {router} router, {experts} experts, top-{top_k})",
        f"Calibrated on {len(calib)} training samples; measured on {len(x)} test samples. Output fidelity "
        f"(mean cosine to the dense model): {fid:.4f}. Accuracy is "
        + ("argmax accuracy." if ref.dim() == 2 and ref.shape[1] == ctx.data.num_classes
           else "5-fold logistic regression on the outputs (linear probe).")
        + (f" Router recall of the top-{top_k} experts by activation: {ctx.metrics['moefy_router_recall']:.3f}."
           if recall else ""),
        table(rows, [("label", "model", "{}"), ("accuracy", "accuracy", "{:.4f}"),
                     ("ffn_flops", "FFN FLOPs/sample", "{:,.0f}"), ("flops", "FLOPs/sample", "{:,.0f}")]),
    ])


class SentenceClassifier(nn.Module):
    """A linear classifier on a sentence encoder's pooled embedding, for fine-tuning.

    Trailing columns that are padding in every row are cut before encoding (batches padded to
    a fixed length cost only their longest sentence).

    Shapes:
        (B, T) int64 ids -> (B, num_classes) logits
    """

    def __init__(self, encoder: nn.Module, dim: int, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(dim, num_classes)

    def forward(self, ids: Tensor) -> Tensor:
        keep = int((ids != 0).any(0).nonzero().max()) + 1 if bool((ids != 0).any()) else 1
        return self.head(self.encoder(ids[:, :keep]))


def finetune_classifier(encoder: nn.Module, dim: int, train: Split, test: Split, *, num_classes: int = 2,
                        epochs: int = 1, batch_size: int = 16, lr: float = 3e-5, head_lr: float = 1e-3,
                        warmup_steps: int = 20, seed: int = 0) -> dict[str, Any]:
    """Fine-tune a copy of ``encoder`` with a linear head (AdamW, cosine schedule); test accuracy.

    The encoder's own router (an MoEfied FFN's gate) is trained with it as far as it is
    differentiable; EMoE's avg-k gate follows the fine-tuned keys by construction.

    Returns:
        ``{"accuracy", "loss", "steps", "history"}`` on ``test``.
    """
    torch.manual_seed(seed)
    model = SentenceClassifier(copy.deepcopy(encoder), dim, num_classes)
    groups = [{"params": list(model.encoder.parameters()), "lr": lr}, {"params": list(model.head.parameters()),
                                                                       "lr": head_lr}]
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    cfg = FitConfig(epochs=epochs, batch_size=batch_size, seed=seed, schedule="cosine", warmup_steps=warmup_steps)
    loss_fn = build_loss("cross_entropy")
    history = fit(model, train, Split(train.x[:0], train.y[:0]), loss_fn, opt, cfg, progress=False)
    result = evaluate(model, test, loss_fn, batch_size=128)
    steps = epochs * -(-len(train) // batch_size)
    return {"accuracy": result["accuracy"], "loss": result["loss"], "steps": steps, "history": history}
