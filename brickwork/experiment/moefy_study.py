"""The MoEfication study of all-MiniLM-L6-v2 behind ``brickwork moefy``: conversion, fidelity and
cost over E and top-k, clusterings and routers compared, fine-tuning, modularity, layer
importance, and the report that puts them together.

:class:`Study` holds the dense model, its tokenizer and the evaluation sets (Rotten Tomatoes
snippets split once by seed into calibration, evaluation and fine-tuning sentences, disjoint;
WordSim-353); each method measures one part of the report and returns plain rows, which
:meth:`Study.report` renders to markdown with plots.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from brickwork.analysis.embedding_eval import EvalSets, embed, module_flops, plot_quality_vs_flops, quality
from brickwork.analysis.modularity import (
    layer_modularity,
    plot_coactivation,
    plot_modularity,
    routing_by_class,
)
from brickwork.analysis.plots import plot_accuracy_vs_flops
from brickwork.analysis.routing import plot_routing_heatmap
from brickwork.bench.timing import interleaved
from brickwork.data.base import Split
from brickwork.data.sentences import rotten_tomatoes, token_batches, wordsim353
from brickwork.experiment.report import markdown_table as table
from brickwork.experiment.stages.moefy import finetune_classifier
from brickwork.ops.chain import drop_attention, drop_layers, layer_importance, least_important
from brickwork.ops.moefy import ffn_inputs, moefy, moefy_like, partition_ffn, set_top_k
from brickwork.ops.moefy_cluster import coactivation_counts, partition_to_labels
from brickwork.train.checkpoint import load_model, save_model

COLUMNS = [("label", "model", "{}"), ("fidelity", "fidelity", "{:.4f}"),
           ("fidelity_words", "fidelity (words)", "{:.4f}"),
           ("accuracy", "RT probe acc", "{:.4f}"), ("accuracy_std", "± (folds)", "{:.4f}"),
           ("wordsim", "WordSim ρ", "{:.4f}"), ("ffn_flops", "FFN FLOPs/sent", "{:,.0f}"),
           ("ffn_ratio", "FFN share", "{:.3f}"), ("flops", "FLOPs/sent", "{:,.0f}"), ("encode_s", "encode s", "{:.1f}")]


def load_converted(stem: str | Path) -> nn.Module:
    """Rebuild a model written by ``brickwork moefy`` and load its weights (checked by hash)."""
    from brickwork.models.minilm import minilm
    from brickwork.persist import read_json

    meta = read_json(Path(stem).with_suffix(".json"))["moefy"]
    model = moefy_like(minilm(), meta["experts"], meta["top_k"], meta["router"])
    load_model(stem, model)
    return model.eval()


class Study:
    """MiniLM, its tokenizer, the evaluation sets, the dense reference, and each part of the report."""

    def __init__(self, args: argparse.Namespace, model: nn.Module, tok: Any, calib: list[str], sets: EvalSets,
                 ft_texts: list[str], ft_labels: list[int]) -> None:
        from brickwork.models.minilm import encode

        self.args, self.model, self.tok, self.sets = args, model, tok, sets
        self.encode = lambda m, texts: encode(m, tok, texts, batch_size=64)
        self.calib_ids = tok(calib)
        self.eval_ids = tok(sets.texts)
        self.ft_texts, self.ft_labels = ft_texts, ft_labels
        self.flop_batches = [b for b, _ in token_batches(self.eval_ids[:256], 64)]
        t0 = time.perf_counter()
        self.ref = embed(lambda t: self.encode(model, t), sets)
        self.dense_row = self._row(model, "dense", self.ref, time.perf_counter() - t0, series="dense")
        self.main: nn.Module = model

    @classmethod
    def load(cls, args: argparse.Namespace) -> Study:
        from brickwork.models.minilm import Tokenizer, minilm

        texts, labels = rotten_tomatoes()
        pairs = wordsim353()
        perm = torch.randperm(len(texts), generator=torch.Generator().manual_seed(args.seed)).tolist()
        c, n = args.calib_sentences, args.eval_sentences
        ev, ft = perm[c : c + n], perm[c + n : c + n + args.finetune_train]
        sets = EvalSets.build([texts[i] for i in ev], [labels[i] for i in ev], pairs)
        return cls(args, minilm(), Tokenizer(128), [texts[i] for i in perm[:c]], sets,
                   [texts[i] for i in ft], [labels[i] for i in ft])

    def calib_batches(self) -> list[torch.Tensor]:
        return [b for b, _ in token_batches(self.calib_ids, 64)]

    def _row(self, model: nn.Module, label: str, emb: Any, seconds: float, **extra: Any) -> dict[str, Any]:
        row = {"label": label, **quality(emb, self.sets, self.ref), **module_flops(model, self.flop_batches),
               "encode_s": seconds, **extra}
        if hasattr(self, "dense_row"):
            row["ffn_ratio"] = row["ffn_flops"] / self.dense_row["ffn_flops"]
        return row

    def measure(self, model: nn.Module, label: str, **extra: Any) -> dict[str, Any]:
        t0 = time.perf_counter()
        emb = embed(lambda t: self.encode(model, t), self.sets)
        row = self._row(model, label, emb, time.perf_counter() - t0, **extra)
        print(f"  {label}: fidelity {row['fidelity']:.4f}, probe {row['accuracy']:.4f}, wordsim {row['wordsim']:.4f}, "
              f"FFN x{row.get('ffn_ratio', 1.0):.3f}", flush=True)
        return row

    def convert(self, experts: int, top_k: int, clustering: str, router: str) -> tuple[nn.Module, dict]:
        return moefy(self.model, self.calib_batches(), num_experts=experts, top_k=top_k, clustering=clustering,
                     router=router, seed=self.args.seed)

    def convert_and_save(self, out: Path) -> dict[str, Any]:
        a = self.args
        conv, stats = self.convert(a.experts, a.top_k, a.clustering, a.router)
        meta = {"model": "minilm-l6", "moefy": {"experts": a.experts, "top_k": a.top_k, "clustering": a.clustering,
                                                "router": a.router, "calib_sentences": a.calib_sentences},
                "router_stats": {str(k): v for k, v in stats.items()}}
        save_model(out / "model", conv, meta)
        x = self.eval_ids[:32]
        with torch.no_grad():
            diff = float((load_converted(out / "model")(x) - conv.eval()(x)).abs().max())
        self.main = conv
        recall = [s["recall"] for s in stats.values() if "recall" in s]
        return self.measure(conv, f"{a.clustering}+{a.router} E={a.experts} k={a.top_k}", reload_max_abs_diff=diff,
                            router_recall=sum(recall) / len(recall) if recall else None,
                            router_stats={str(k): v for k, v in stats.items()})

    def sweep(self, experts: list[int], ratios: list[float]) -> list[dict[str, Any]]:
        a, rows = self.args, []
        print(f"sweep ({a.clustering}+{a.router}):", flush=True)
        for e in experts:
            conv, _ = self.convert(e, max(1, e // 4), a.clustering, a.router)
            for k in sorted({min(e, max(1, round(r * e))) for r in ratios}):
                set_top_k(conv, k)
                rows.append(self.measure(conv, f"E={e} k={k}", series=f"E={e}", experts=e, top_k=k))
        return rows

    def compare(self, ratios: list[float]) -> list[dict[str, Any]]:
        a, rows = self.args, []
        e = a.experts
        combos = [(c, r) for c in ("kmeans", "coactivation") for r in ("emoe", "mlp")] + [("random", "emoe")]
        print(f"compare at E={e}:", flush=True)
        for c, r in combos:
            conv, stats = self.convert(e, max(1, e // 4), c, r)
            recall = [s["recall"] for s in stats.values() if "recall" in s]
            for k in sorted({min(e, max(1, round(q * e))) for q in ratios}):
                set_top_k(conv, k)
                rows.append(self.measure(conv, f"{c}+{r} k={k}", series=f"{c}+{r}", experts=e, top_k=k,
                                         router_recall=sum(recall) / len(recall) if recall and k == e // 4 else None))
        return rows

    def timing(self) -> dict[str, float]:
        texts = self.sets.texts[:256]
        t = interleaved({"dense": lambda: self.encode(self.model, texts),
                         "moefy": lambda: self.encode(self.main, texts)}, repeats=3, warmup=1)
        return {"sentences": len(texts), "dense_s": t["dense"], "moefy_s": t["moefy"], "ratio": t["moefy"] / t["dense"]}

    def finetune(self, seeds: int, n_train: int, epochs: int, top_ks: list[int]) -> dict[str, Any]:
        """Dense and converted encoders (the latter at each of ``top_ks``) fine-tuned with one budget."""
        from brickwork.models.minilm import Tokenizer

        tok64 = Tokenizer(64)
        train = Split(tok64(self.ft_texts), torch.tensor(self.ft_labels))
        test = Split(tok64(self.sets.texts), torch.from_numpy(self.sets.labels).long())
        out: dict[str, Any] = {"train": len(train), "test": len(test), "epochs": epochs, "runs": []}
        encoders = [("dense", self.model)]
        for k in top_ks:
            conv = copy.deepcopy(self.main)
            set_top_k(conv, k)
            encoders.append((f"moefy k={k}", conv))
        for name, enc in encoders:
            for seed in range(seeds):
                t0 = time.perf_counter()
                r = finetune_classifier(enc, 384, train, test, epochs=epochs, seed=seed)
                out["runs"].append({"model": name, "seed": seed, "accuracy": r["accuracy"], "loss": r["loss"],
                                    "steps": r["steps"], "seconds": time.perf_counter() - t0})
                print(f"  fine-tune {name} seed {seed}: test accuracy {r['accuracy']:.4f}", flush=True)
        return out

    def modularity(self, out: Path) -> dict[str, Any]:
        e = self.args.experts
        inputs = ffn_inputs(self.model, self.calib_batches())
        rows = []
        for i, x in inputs.items():
            ffn = self.model.body.layers[i].ffn
            fired = torch.nn.functional.linear(x, ffn.up.weight, ffn.up.bias) > 0
            parts = {"coactivation": partition_ffn(ffn, e, "coactivation", x, self.args.seed),
                     "kmeans": partition_ffn(ffn, e, "kmeans", None, self.args.seed)}
            rows.append({"layer": i, "tokens": len(x), **layer_modularity(fired.detach(), parts, seed=self.args.seed)})
            if i == len(inputs) // 2:
                plot_coactivation(coactivation_counts(fired), partition_to_labels(parts["coactivation"]),
                                  out / "plots" / "coactivation.png", title=f"layer {i}: co-activation, {e} groups")
        plot_modularity(rows, ["coactivation", "kmeans", "random"], out / "plots" / "modularity.png")
        batches = list(token_batches(self.eval_ids, 64, torch.from_numpy(self.sets.labels).long()))
        spec = routing_by_class(self.main, batches, 2, seed=self.args.seed)
        paths = sorted(spec, key=lambda p: int(p.split(".")[2]))
        mat = torch.cat([spec[p]["fractions"] for p in paths])
        names = [f"L{p.split('.')[2]} {c}" for p in paths for c in ("rotten", "fresh")]
        if paths:
            plot_routing_heatmap(mat, out / "plots" / "specialisation.png", row_names=names, row_label="layer, class",
                                 title="share of each class's tokens routed to each expert")
        return {"layers": rows, "specialisation": [{"layer": int(p.split(".")[2]), "js": spec[p]["js"],
                                                    "js_shuffled": spec[p]["js_shuffled"]} for p in paths]}

    def importance(self, max_drop: int) -> dict[str, Any]:
        batches = [b for b, _ in token_batches(self.eval_ids[:256], 64)]
        scores = {"block": layer_importance(self.model, batches, "block"),
                  "attention": layer_importance(self.model, batches, "attention")}
        rows = []
        print("layer dropping:", flush=True)
        for part, s in scores.items():
            for k in range(1, max_drop + 1):
                drop = least_important(s, k)
                pruned = drop_layers(self.model, drop) if part == "block" else drop_attention(self.model, drop)
                rows.append(self.measure(pruned, f"-{part} {drop}", series=f"drop {part}", part=part, k=k,
                                         dropped=drop))
        return {"scores": scores, "rows": rows}

    def report(self, results: dict[str, Any], out: Path) -> str:
        from brickwork.bench.machine import describe

        a, d, m = self.args, self.dense_row, results["main"]
        lines = [f"# MoEfication of all-MiniLM-L6-v2: {a.clustering} clustering, {a.router} router",
                 f"`brickwork moefy --experts {a.experts} --top-k {a.top_k} --clustering {a.clustering} --router "
                 f"{a.router}` on {describe()}. Rotten Tomatoes snippets (seed {a.seed}): {a.calib_sentences} for "
                 f"calibration, {len(self.sets.texts)} for evaluation (fidelity, 5-fold logistic-regression probe, "
                 f"fine-tuning test), disjoint; WordSim-353: {len(self.sets.pairs)} pairs. Fidelity = mean cosine of "
                 "each sentence's (word's) embedding to the dense model's. FFN FLOPs are counted at the dispatcher "
                 "in the FFN / MoE modules (router included) on 256 evaluation sentences without padding.",
                 "## Converted model",
                 "Written to `model.safetensors` + `model.json`; reloaded outputs differ from the converted "
                 f"model's by at most {m['reload_max_abs_diff']:.1e}."
                 + (f" Mean router recall of the top-{a.top_k} experts by activation: {m['router_recall']:.3f}."
                    if m.get("router_recall") is not None else ""),
                 table([d, m], COLUMNS)]
        curve = [d] + results.get("sweep", [])
        if results.get("sweep"):
            lines += ["## Fidelity and cost over E and top-k", table(curve, COLUMNS)]
        if results.get("compare"):
            lines += [f"## Clusterings and routers at E = {a.experts}", table([d] + results["compare"],
                      COLUMNS + [("router_recall", "router recall", "{:.3f}")])]
        rows = curve + results.get("compare", [])
        if len(rows) > 1:
            plot_quality_vs_flops(rows, str(out / "plots" / "quality_vs_ffn_flops.png"))
            plot_accuracy_vs_flops([{"label": r["label"].replace(" ", ""), "accuracy": r["accuracy"],
                                     "flops": r["flops"]} for r in curve], out / "plots" / "probe_vs_flops.png",
                                   title="Sentiment probe accuracy against FLOPs per sentence")
            lines += ["![quality against FFN FLOPs](plots/quality_vs_ffn_flops.png)",
                      "![probe accuracy against FLOPs](plots/probe_vs_flops.png)"]
        t = results["timing"]
        lines += ["## Encode time", f"{t['sentences']} evaluation sentences, interleaved, median of 3 after warm-up: "
                  f"dense {t['dense_s']:.2f} s, converted {t['moefy_s']:.2f} s (x{t['ratio']:.2f}). The `encode s` "
                  "column above is one pass over the evaluation set per row, not interleaved (the machine is shared)."]
        if "finetune" in results:
            f = results["finetune"]
            summary = []
            for name in dict.fromkeys(r["model"] for r in f["runs"]):
                accs = torch.tensor([r["accuracy"] for r in f["runs"] if r["model"] == name])
                summary.append({"label": name, "mean": float(accs.mean()),
                                "std": float(accs.std()) if len(accs) > 1 else 0.0,
                                "runs": ", ".join(f"{x:.4f}" for x in accs.tolist()),
                                "steps": f["runs"][0]["steps"]})
            lines += ["## Fine-tuning on Rotten Tomatoes",
                      f"Each encoder plus a linear head on its pooled embedding, fine-tuned with the same budget "
                      f"({f['epochs']} epoch over {f['train']} snippets, batch 16, AdamW lr 3e-5 / head 1e-3, cosine, "
                      f"max 64 tokens), tested on the {f['test']} evaluation snippets; "
                      f"{max(r['seed'] for r in f['runs']) + 1} seeds each; `moefy k=K` is the converted model "
                      f"(E = {a.experts}) fine-tuned computing K experts per token (EMoE fine-tunes its "
                      "converted model the same way: experts, keys and avg-k gate together).",
                      table(summary, [("label", "model", "{}"), ("mean", "test accuracy", "{:.4f}"),
                                      ("std", "std", "{:.4f}"), ("runs", "per seed", "{}"), ("steps", "steps", "{}")])]
        if "modularity" in results:
            mo = results["modularity"]
            lines += ["## Modularity",
                      f"Newman Q of the neuron co-activation graph (tokens of the calibration text) partitioned into "
                      f"{a.experts} equal groups, against random equal partitions (mean ± std of 20).",
                      table(mo["layers"], [("layer", "layer", "{}"), ("tokens", "tokens", "{}"),
                                           ("density", "firing share", "{:.3f}"), ("coactivation", "Q co-activation",
                                                                                   "{:.4f}"),
                                           ("kmeans", "Q k-means", "{:.4f}"), ("random", "Q random", "{:.4f}"),
                                           ("random_std", "± random", "{:.4f}")]),
                      "![modularity](plots/modularity.png)", "![co-activation](plots/coactivation.png)",
                      "Expert specialisation of the converted model on the evaluation snippets: Jensen-Shannon "
                      "divergence between the expert-load distributions of fresh and rotten tokens, against the same "
                      "tokens with shuffled labels.",
                      table(mo["specialisation"], [("layer", "layer", "{}"), ("js", "JS(fresh, rotten)", "{:.5f}"),
                                                   ("js_shuffled", "JS shuffled labels", "{:.5f}")]),
                      "![specialisation](plots/specialisation.png)"]
        if "importance" in results:
            im = results["importance"]
            sc = [{"layer": i, "block": b, "attention": at}
                  for i, (b, at) in enumerate(zip(im["scores"]["block"], im["scores"]["attention"], strict=True))]
            lines += ["## Layer importance", "1 - cos(input, output) on 256 evaluation sentences (He et al., "
                      "2024); the attention sublayer of a post-norm block is norm1(h + attn(h)) and is dropped whole.",
                      table(sc, [("layer", "layer", "{}"), ("block", "block", "{:.4f}"),
                                 ("attention", "attention", "{:.4f}")]),
                      "Dropping the k least important:", table([d] + im["rows"], COLUMNS)]
        return "\n\n".join(lines) + "\n"
