"""The Markdown sections of the MoEfication study (``moefy_study`` stage, ``brickwork moefy``).

Pure formatting of the rows the stage measured, every table through
:func:`~brickwork.experiment.report.markdown_table`; image paths are relative to the run folder.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from brickwork.analysis.encoder_bench import EncoderBench
from brickwork.experiment.report import Column
from brickwork.experiment.report import markdown_table as table

#: Columns of every table of encoder rows.
COLUMNS: list[Column] = [
    ("label", "model", "{}"),
    ("fidelity", "fidelity", "{:.4f}"),
    ("fidelity_words", "fidelity (words)", "{:.4f}"),
    ("accuracy", "RT probe acc", "{:.4f}"),
    ("accuracy_std", "± (folds)", "{:.4f}"),
    ("wordsim", "WordSim ρ", "{:.4f}"),
    ("ffn_flops", "FFN FLOPs/sent", "{:,.0f}"),
    ("ffn_ratio", "FFN share", "{:.3f}"),
    ("flops", "FLOPs/sent", "{:,.0f}"),
    ("encode_s", "encode s", "{:.1f}"),
]


def _rows_table(rows: list[dict[str, Any]], columns: list[Column] = COLUMNS) -> str:
    # The fold std is its own column here, not a ``± std`` suffix of the accuracy cell.
    return table(
        [{k: v for k, v in r.items() if k != "accuracy_std"} | {"probe_std": r.get("accuracy_std")} for r in rows],
        [(("probe_std", h, f) if k == "accuracy_std" else (k, h, f)) for k, h, f in columns],
    )


def study_report(setting: Mapping[str, Any], bench: EncoderBench, results: Mapping[str, Any]) -> list[str]:
    """The study's sections: conversion, sweep, comparison, encode time, fine-tuning, modularity,
    layer importance (each only when it was measured)."""
    s, d, m = setting, bench.dense_row, results["main"]
    out = [
        f"### MoEfication of all-MiniLM-L6-v2: {s['clustering']} clustering, {s['router']} router",
        f"`moefy_study` (what `brickwork moefy` runs) with E = {s['experts']}, top-k = {s['top_k']}, on "
        f"{s['machine']}. Rotten Tomatoes snippets (seed {s['seed']}): {s['calib_sentences']} for calibration, "
        f"{len(bench.sets.texts)} for evaluation (fidelity, 5-fold logistic-regression probe, fine-tuning test), "
        f"disjoint; WordSim-353: {len(bench.sets.pairs)} pairs. Fidelity = mean cosine of each sentence's (word's) "
        "embedding to the dense model's. FFN FLOPs are counted at the dispatcher in the FFN / MoE modules (router "
        "included) on 256 evaluation sentences without padding.",
        "### Converted model",
        "Saved as the variant's checkpoint; reloaded (rebuilt from its recipe, weights verified) its outputs "
        f"differ from the converted model's by at most {m['reload_max_abs_diff']:.1e}."
        + (
            f" Mean router recall of the top-{s['top_k']} experts by activation: {m['router_recall']:.3f}."
            if m.get("router_recall") is not None
            else ""
        ),
        _rows_table([d, m]),
    ]
    if results.get("sweep"):
        out += ["### Fidelity and cost over E and top-k", _rows_table([d, *results["sweep"]])]
    if results.get("compare"):
        out += [
            f"### Clusterings and routers at E = {s['experts']}",
            _rows_table([d, *results["compare"]], [*COLUMNS, ("router_recall", "router recall", "{:.3f}")]),
        ]
    if len([d, *results.get("sweep", []), *results.get("compare", [])]) > 1:
        out += ["![quality against FFN FLOPs](plots/quality_vs_ffn_flops.png)"]
    t = results["timing"]
    out += [
        "### Encode time",
        f"{t['sentences']} evaluation sentences, interleaved, median of 3 after warm-up: "
        f"dense {t['dense_s']:.2f} s, converted {t['moefy_s']:.2f} s (x{t['ratio']:.2f}). The `encode s` column "
        "above is one pass over the evaluation set per row, not interleaved (the machine is shared).",
    ]
    if "finetune" in results:
        out += _finetune_section(results["finetune"], s["experts"])
    if "modularity" in results:
        out += _modularity_section(results["modularity"], s["experts"])
    if "importance" in results:
        im = results["importance"]
        scores = [
            {"layer": i, "block": b, "attention": a}
            for i, (b, a) in enumerate(zip(im["scores"]["block"], im["scores"]["attention"], strict=True))
        ]
        out += [
            "### Layer importance",
            "1 - cos(input, output) on 256 evaluation sentences (He et al., 2024); the "
            "attention sublayer of a post-norm block is norm1(h + attn(h)) and is dropped whole.",
            table(
                scores, [("layer", "layer", "{}"), ("block", "block", "{:.4f}"), ("attention", "attention", "{:.4f}")]
            ),
            "Dropping the k least important:",
            _rows_table([d, *im["rows"]]),
        ]
    return out


def _finetune_section(f: Mapping[str, Any], experts: int) -> list[str]:
    summary = []
    for name in dict.fromkeys(r["model"] for r in f["runs"]):
        accs = torch.tensor([r["accuracy"] for r in f["runs"] if r["model"] == name])
        summary.append(
            {
                "label": name,
                "mean": float(accs.mean()),
                "std": float(accs.std()) if len(accs) > 1 else 0.0,
                "runs": ", ".join(f"{x:.4f}" for x in accs.tolist()),
                "steps": f["runs"][0]["steps"],
            }
        )
    return [
        "### Fine-tuning on Rotten Tomatoes",
        f"Each encoder plus a linear head on its pooled embedding, fine-tuned with the same budget ({f['epochs']} "
        f"epoch over {f['train']} snippets, batch 16, AdamW lr 3e-5 / head 1e-3, cosine, max 64 tokens), tested on "
        f"the {f['test']} evaluation snippets; {max(r['seed'] for r in f['runs']) + 1} seeds each; `moefy k=K` is "
        f"the converted model (E = {experts}) fine-tuned computing K experts per token (EMoE fine-tunes its "
        "converted model the same way: experts, keys and avg-k gate together).",
        table(
            summary,
            [
                ("label", "model", "{}"),
                ("mean", "test accuracy", "{:.4f}"),
                ("std", "std", "{:.4f}"),
                ("runs", "per seed", "{}"),
                ("steps", "steps", "{}"),
            ],
        ),
    ]


def _modularity_section(mo: Mapping[str, Any], experts: int) -> list[str]:
    return [
        "### Modularity",
        f"Newman Q of the neuron co-activation graph (tokens of the calibration text) partitioned into {experts} "
        "equal groups, against random equal partitions (mean ± std of 20).",
        table(
            [
                {k: v for k, v in r.items() if k != "random_std"} | {"random_spread": r["random_std"]}
                for r in mo["layers"]
            ],
            [
                ("layer", "layer", "{}"),
                ("tokens", "tokens", "{}"),
                ("density", "firing share", "{:.3f}"),
                ("coactivation", "Q co-activation", "{:.4f}"),
                ("kmeans", "Q k-means", "{:.4f}"),
                ("random", "Q random", "{:.4f}"),
                ("random_spread", "± random", "{:.4f}"),
            ],
        ),
        "![modularity](plots/modularity.png)",
        "![co-activation](plots/coactivation.png)",
        "Expert specialisation of the converted model on the evaluation snippets: Jensen-Shannon divergence "
        "between the expert-load distributions of fresh and rotten tokens, against the same tokens with "
        "shuffled labels.",
        table(
            mo["specialisation"],
            [
                ("layer", "layer", "{}"),
                ("js", "JS(fresh, rotten)", "{:.5f}"),
                ("js_shuffled", "JS shuffled labels", "{:.5f}"),
            ],
        ),
        "![specialisation](plots/specialisation.png)",
    ]
