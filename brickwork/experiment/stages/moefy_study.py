"""The ``moefy_study`` stage: the MoEfication study of all-MiniLM-L6-v2, what ``brickwork moefy`` runs.

One conversion is kept (``ctx.model`` becomes it, its recipe joins ``ctx.structure``); around it
the stage measures, each part switchable: fidelity and cost over E and top-k (``sweep_*``),
clusterings and routers compared (``compare_ratios``), encode time, dense against converted
fine-tuning on Rotten Tomatoes over seeds (``finetune_*``), modularity of the co-activation
graphs and expert specialisation (``modularity``), and layer importance with the effect of
dropping layers (``max_drop``). Every row is one :meth:`~brickwork.analysis.encoder_bench.EncoderBench.measure`
against the dense encoder on the same text (:func:`~brickwork.analysis.encoder_bench.study_texts`:
Rotten Tomatoes snippets split once by ``seed`` into calibration, evaluation and fine-tuning
sentences, disjoint, and WordSim-353), drawn from the packaged corpora whatever ``data:`` the run
loads. The rows go to ``stage<k>-results.json`` in the variant's folder (``brickwork moefy``
copies them to ``results.json``), the tables to the run's report.
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import Field
from torch import nn

from brickwork.analysis.embedding_eval import encode_seconds, plot_quality_vs_flops
from brickwork.analysis.encoder_bench import EncoderBench, StudyTexts, study_texts
from brickwork.analysis.modularity import (
    fired_neurons,
    layer_modularity,
    plot_modularity,
    plot_partition_coactivation,
    plot_specialisation,
    routing_by_class,
    specialisation_rows,
)
from brickwork.analysis.timing import describe_machine
from brickwork.data.base import Split
from brickwork.data.batching import input_batches
from brickwork.data.sentences import token_batches
from brickwork.experiment.build import load, model_meta, variant_spec
from brickwork.experiment.context import StageContext
from brickwork.experiment.moefy_report import study_report
from brickwork.models.bert import encoder_tokenizer
from brickwork.models.minilm import Tokenizer, encode
from brickwork.nn.ffn import FeedForward
from brickwork.nn.stack import StackModel, stack_of
from brickwork.ops.chain import drop_attention, drop_layers, layer_importance, least_important
from brickwork.ops.moefy import Clustering, RouterKind, ffn_inputs, moefy, partition_ffn, set_top_k
from brickwork.persist import atomic_write_text
from brickwork.registry import register
from brickwork.textio import dumps
from brickwork.train.checkpoint import save_model
from brickwork.train.finetune import finetune_classifier

PositiveInt = Annotated[int, Field(ge=1)]
Ratio = Annotated[float, Field(gt=0, le=1)]
#: The clusterings and routers compared (random clustering with the training-free router only).
COMBOS: list[tuple[Clustering, RouterKind]] = [
    ("kmeans", "emoe"),
    ("kmeans", "mlp"),
    ("coactivation", "emoe"),
    ("coactivation", "mlp"),
    ("random", "emoe"),
]


@register("stage", "moefy_study")
def moefy_study(
    ctx: StageContext,
    /,
    experts: PositiveInt = 16,
    top_k: PositiveInt = 4,
    clustering: Clustering = "kmeans",
    router: RouterKind = "emoe",
    calib_sentences: PositiveInt = 800,
    eval_sentences: Annotated[int, Field(ge=10)] = 1000,
    sweep_experts: list[PositiveInt] = [8, 16, 32],  # noqa: B006 - read only
    sweep_ratios: list[Ratio] = [0.125, 0.25, 0.5, 0.75, 1.0],  # noqa: B006 - read only
    compare_ratios: list[Ratio] = [0.25, 0.5],  # noqa: B006 - read only
    finetune_seeds: Annotated[int, Field(ge=0)] = 3,
    finetune_train: PositiveInt = 3000,
    finetune_epochs: PositiveInt = 1,
    finetune_top_k: list[PositiveInt] | None = None,
    modularity: bool = True,
    max_drop: Annotated[int, Field(ge=0)] = 3,
    seed: int = 0,
) -> None:
    """Convert the MiniLM encoder (``experts``, ``top_k``, ``clustering``, ``router``) and measure
    it and its variants against the dense one. Empty ``sweep_experts`` / ``compare_ratios``,
    ``finetune_seeds: 0``, ``modularity: false`` and ``max_drop: 0`` skip those parts;
    ``finetune_top_k`` defaults to ``[top_k]``."""
    dense = stack_of(ctx.model)
    texts = study_texts(seed, calib_sentences, eval_sentences, finetune_train)
    spec = variant_spec(ctx.run_dir, ctx.label)  # a ``bert`` folder brings its own tokenizer.json

    def tokenizer(max_len: int) -> Tokenizer:
        return encoder_tokenizer(spec.name, spec.args, max_len, where=f"models.{ctx.label}.path")

    tok = tokenizer(128)
    bench = EncoderBench.build(dense, lambda m, t: encode(m, tok, t, batch_size=64), tok, texts.sets)
    calib = list(input_batches(tok(texts.calib), 64, padded=True))
    results: dict[str, Any] = {}
    main, results["main"] = _convert_and_reload(ctx, bench, dense, calib, experts, top_k, clustering, router, seed)
    if sweep_experts:
        results["sweep"] = _sweep(bench, dense, calib, sweep_experts, sweep_ratios, clustering, router, seed)
    if compare_ratios:
        results["compare"] = _compare(bench, dense, calib, experts, compare_ratios, seed)
    t = encode_seconds(
        {
            "dense": lambda: bench.encode(dense, texts.sets.texts[:256]),
            "moefy": lambda: bench.encode(main, texts.sets.texts[:256]),
        },
        repeats=3,
    )
    results["timing"] = {
        "sentences": len(texts.sets.texts[:256]),
        "dense_s": t["dense"],
        "moefy_s": t["moefy"],
        "ratio": t["moefy"] / t["dense"],
    }
    if finetune_seeds:
        ks = finetune_top_k or [top_k]
        results["finetune"] = _finetune(dense, main, texts, tokenizer(64), finetune_seeds, finetune_epochs, ks)
    if modularity:
        results["modularity"] = _modularity(dense, main, bench, calib, experts, seed, ctx.run_dir / "plots")
    if max_drop:
        results["importance"] = _importance(bench, dense, max_drop)

    ctx.model = main
    ctx.structure.append({"op": "moefy", "experts": experts, "top_k": top_k, "router": router})
    m, d = results["main"], bench.dense_row
    ctx.metrics.update(
        moefy_fidelity=m["fidelity"],
        moefy_accuracy=m["accuracy"],
        dense_accuracy=d["accuracy"],
        moefy_ffn_flops_ratio=m["ffn_ratio"],
    )
    if m.get("router_recall") is not None:
        ctx.metrics["moefy_router_recall"] = m["router_recall"]
    ctx.points.extend(
        {"label": r["label"].replace(" ", ""), "accuracy": r["accuracy"], "flops": r["flops"]}
        for r in [d, m, *results.get("sweep", [])]
    )
    rows = [d, *results.get("sweep", []), *results.get("compare", [])]
    if len(rows) > 1:
        plot_quality_vs_flops(rows, str(ctx.run_dir / "plots" / "quality_vs_ffn_flops.png"))
    setting = {
        "experts": experts,
        "top_k": top_k,
        "clustering": clustering,
        "router": router,
        "seed": seed,
        "calib_sentences": calib_sentences,
        "machine": describe_machine(),
    }
    ctx.report.extend(study_report(setting, bench, results))
    atomic_write_text(
        ctx.stage_path("results").with_suffix(".json"),
        dumps({"dense": bench.dense_row, **results}, "results", indent=2) + "\n",
    )


def _measure(bench: EncoderBench, model: nn.Module, label: str, **extra: Any) -> dict[str, Any]:
    row = bench.measure(model, label, **extra)
    print(
        f"  {label}: fidelity {row['fidelity']:.4f}, probe {row['accuracy']:.4f}, wordsim {row['wordsim']:.4f}, "
        f"FFN x{row.get('ffn_ratio', 1.0):.3f}",
        flush=True,
    )
    return row


def _mean_recall(stats: dict[int, dict[str, float]]) -> float | None:
    recall = [s["recall"] for s in stats.values() if "recall" in s]
    return sum(recall) / len(recall) if recall else None


def _top_ks(experts: int, ratios: Sequence[float]) -> list[int]:
    return sorted({min(experts, max(1, round(r * experts))) for r in ratios})


def _convert_and_reload(
    ctx: StageContext,
    bench: EncoderBench,
    dense: StackModel,
    calib: list[torch.Tensor],
    experts: int,
    top_k: int,
    clustering: Clustering,
    router: RouterKind,
    seed: int,
) -> tuple[nn.Module, dict[str, Any]]:
    """The kept conversion, and its row; it is saved and reloaded through :func:`build.load` first,
    so the row records that the checkpoint reproduces it (``reload_max_abs_diff``)."""
    conv, stats = moefy(dense, calib, num_experts=experts, top_k=top_k, clustering=clustering, router=router, seed=seed)
    recipe = {"op": "moefy", "experts": experts, "top_k": top_k, "router": router}
    meta = model_meta(variant_spec(ctx.run_dir, ctx.label), ctx.data, [*ctx.structure, recipe])
    x = bench.eval_ids[:32]
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        save_model(Path(tmp) / "model", conv, meta)
        diff = float((load(Path(tmp) / "model").model.eval()(x) - conv.eval()(x)).abs().max())
    router_stats = {str(k): v for k, v in stats.items()}
    row = _measure(
        bench,
        conv,
        f"{clustering}+{router} E={experts} k={top_k}",
        reload_max_abs_diff=diff,
        router_recall=_mean_recall(stats),
        router_stats=router_stats,
    )
    return conv, row


def _sweep(
    bench: EncoderBench,
    dense: StackModel,
    calib: list[torch.Tensor],
    experts: Sequence[int],
    ratios: Sequence[float],
    clustering: Clustering,
    router: RouterKind,
    seed: int,
) -> list[dict[str, Any]]:
    print(f"sweep ({clustering}+{router}):", flush=True)
    rows = []
    for e in experts:
        conv, _ = moefy(
            dense, calib, num_experts=e, top_k=max(1, e // 4), clustering=clustering, router=router, seed=seed
        )
        for k in _top_ks(e, ratios):
            set_top_k(conv, k)
            rows.append(_measure(bench, conv, f"E={e} k={k}", series=f"E={e}", experts=e, top_k=k))
    return rows


def _compare(
    bench: EncoderBench, dense: StackModel, calib: list[torch.Tensor], experts: int, ratios: Sequence[float], seed: int
) -> list[dict[str, Any]]:
    print(f"compare at E={experts}:", flush=True)
    rows = []
    for c, r in COMBOS:
        conv, stats = moefy(
            dense, calib, num_experts=experts, top_k=max(1, experts // 4), clustering=c, router=r, seed=seed
        )
        recall = _mean_recall(stats)
        for k in _top_ks(experts, ratios):
            set_top_k(conv, k)
            # Router recall is of the top-k the router was converted with (E/4).
            rows.append(
                _measure(
                    bench,
                    conv,
                    f"{c}+{r} k={k}",
                    series=f"{c}+{r}",
                    experts=experts,
                    top_k=k,
                    router_recall=recall if k == experts // 4 else None,
                )
            )
    return rows


def _finetune(
    dense: StackModel,
    main: nn.Module,
    texts: StudyTexts,
    tok64: Tokenizer,
    seeds: int,
    epochs: int,
    top_ks: Sequence[int],
) -> dict[str, Any]:
    """Dense and converted encoders (the latter at each of ``top_ks``) fine-tuned with one budget."""
    train = Split(tok64(texts.finetune), torch.tensor(texts.finetune_labels))
    test = Split(tok64(texts.sets.texts), torch.from_numpy(texts.sets.labels).long())
    out: dict[str, Any] = {"train": len(train), "test": len(test), "epochs": epochs, "runs": []}
    encoders: list[tuple[str, nn.Module]] = [("dense", dense)]
    for k in top_ks:
        conv = copy.deepcopy(main)
        set_top_k(conv, k)
        encoders.append((f"moefy k={k}", conv))
    for name, enc in encoders:
        for seed in range(seeds):
            t0 = time.perf_counter()
            r = finetune_classifier(enc, 384, train, test, epochs=epochs, seed=seed)
            out["runs"].append(
                {
                    "model": name,
                    "seed": seed,
                    "accuracy": r["accuracy"],
                    "loss": r["loss"],
                    "steps": r["steps"],
                    "seconds": time.perf_counter() - t0,
                }
            )
            print(f"  fine-tune {name} seed {seed}: test accuracy {r['accuracy']:.4f}", flush=True)
    return out


def _modularity(
    dense: StackModel,
    main: nn.Module,
    bench: EncoderBench,
    calib: list[torch.Tensor],
    experts: int,
    seed: int,
    plots: Path,
) -> dict[str, Any]:
    """Q of the dense FFNs' co-activation graphs under both clusterings, and the converted
    model's expert specialisation by class on the evaluation snippets."""
    inputs = ffn_inputs(dense, calib)
    rows = []
    for i, x in inputs.items():
        ffn = dense.body.layers[i].ffn
        assert isinstance(ffn, FeedForward)  # ffn_inputs returns only layers with a FeedForward
        fired = fired_neurons(ffn, x)
        parts = {
            "coactivation": partition_ffn(ffn, experts, "coactivation", x, seed),
            "kmeans": partition_ffn(ffn, experts, "kmeans", None, seed),
        }
        rows.append({"layer": i, "tokens": len(x), **layer_modularity(fired, parts, seed=seed)})
        if i == len(inputs) // 2:
            plot_partition_coactivation(
                fired,
                parts["coactivation"],
                plots / "coactivation.png",
                title=f"layer {i}: co-activation, {experts} groups",
            )
    plot_modularity(rows, ["coactivation", "kmeans", "random"], plots / "modularity.png")
    labels = torch.from_numpy(bench.sets.labels).long()
    by_class = [(ids, y) for ids, y in token_batches(bench.eval_ids, 64, labels) if y is not None]
    spec = routing_by_class(main, by_class, 2, seed=seed)
    if spec:
        plot_specialisation(spec, ["rotten", "fresh"], plots / "specialisation.png")
    return {"layers": rows, "specialisation": specialisation_rows(spec)}


def _importance(bench: EncoderBench, dense: StackModel, max_drop: int) -> dict[str, Any]:
    scores = {
        "block": layer_importance(dense, bench.flop_batches, "block"),
        "attention": layer_importance(dense, bench.flop_batches, "attention"),
    }
    rows = []
    print("layer dropping:", flush=True)
    for part, s in scores.items():
        for k in range(1, max_drop + 1):
            drop = least_important(s, k)
            pruned = drop_layers(dense, drop) if part == "block" else drop_attention(dense, drop)
            rows.append(_measure(bench, pruned, f"-{part} {drop}", series=f"drop {part}", part=part, k=k, dropped=drop))
    return {"scores": scores, "rows": rows}
