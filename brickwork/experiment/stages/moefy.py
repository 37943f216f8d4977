"""The ``moefy`` stage: FFNs into neuron experts, then fidelity and cost on the test split.

The stage replaces ``ctx.model`` by the converted copy. It measures, on the test split, the
cosine similarity of the converted model's outputs to the dense model's, the accuracy of both
(argmax accuracy when the model outputs class logits; otherwise 5-fold logistic regression on
the outputs, i.e. a linear probe of a sentence encoder), and FLOPs per sample in total and in
the FFN / MoE modules (dispatcher count, so unchosen experts cost nothing). The full MiniLM study
is the ``moefy_study`` stage.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from pydantic import Field

from brickwork.analysis.embedding_eval import encoder_outputs, fidelity, module_flops, output_accuracy
from brickwork.data.batching import input_batches
from brickwork.experiment.context import StageContext
from brickwork.experiment.report import markdown_table as table
from brickwork.nn.stack import stack_of
from brickwork.ops.moefy import Clustering, RouterKind, moefy
from brickwork.registry import register


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
    tokens = calib.dtype == torch.long  # sentence ids: batched by length, so no padding is seen
    conv, stats = moefy(
        dense,
        input_batches(calib, batch_size, padded=tokens),
        num_experts=experts,
        top_k=top_k,
        clustering=clustering,
        router=router,
        seed=seed,
    )
    test = ctx.data.test
    x, y = test.x[:eval_samples].to(ctx.device), test.y[:eval_samples].cpu()
    ref, out = encoder_outputs(dense, x, batch_size).cpu(), encoder_outputs(conv, x, batch_size).cpu()
    fid = fidelity(ref.flatten(1), out.flatten(1))
    rows: list[dict[str, Any]] = []
    for label, model, o in (("dense", dense, ref), (f"moefy E={experts} k={top_k}", conv, out)):
        cost = module_flops(model, input_batches(x, batch_size, padded=tokens, limit=256))
        rows.append({"label": label, "accuracy": output_accuracy(o, y, ctx.data.num_classes), **cost})
    recall = [s["recall"] for s in stats.values() if "recall" in s]
    ctx.model = conv
    ctx.structure.append({"op": "moefy", "experts": experts, "top_k": top_k, "router": router})
    ctx.metrics.update(
        moefy_fidelity=fid,
        moefy_accuracy=rows[1]["accuracy"],
        dense_accuracy=rows[0]["accuracy"],
        moefy_ffn_flops_ratio=rows[1]["ffn_flops"] / rows[0]["ffn_flops"],
    )
    if recall:
        ctx.metrics["moefy_router_recall"] = sum(recall) / len(recall)
    ctx.points.extend({"label": r["label"], "accuracy": r["accuracy"], "flops": r["flops"]} for r in rows)
    ctx.report.extend(
        [
            f"### MoEfication ({clustering} clustering, {router} router, {experts} experts, top-{top_k})",
            f"Calibrated on {len(calib)} training samples; measured on {len(x)} test samples. Output fidelity "
            f"(mean cosine to the dense model): {fid:.4f}. Accuracy is "
            + (
                "argmax accuracy."
                if ref.dim() == 2 and ref.shape[1] == ctx.data.num_classes
                else "5-fold logistic regression on the outputs (linear probe)."
            )
            + (
                f" Router recall of the top-{top_k} experts by activation: {ctx.metrics['moefy_router_recall']:.3f}."
                if recall
                else ""
            ),
            table(
                rows,
                [
                    ("label", "model", "{}"),
                    ("accuracy", "accuracy", "{:.4f}"),
                    ("ffn_flops", "FFN FLOPs/sample", "{:,.0f}"),
                    ("flops", "FLOPs/sample", "{:,.0f}"),
                ],
            ),
        ]
    )
