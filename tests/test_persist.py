import pytest
import torch

from brickwork.errors import CheckpointError
from brickwork.persist import load_tensors, save_tensors
from brickwork.train.checkpoint import load_model, save_model


def test_round_trip_with_metadata(tmp_path):
    t = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    save_tensors(tmp_path / "ck", t, {"note": "hi"})
    back, meta = load_tensors(tmp_path / "ck")
    assert meta["note"] == "hi" and len(meta["sha256"]) == 64
    assert torch.equal(back["a"], t["a"]) and torch.equal(back["b"], t["b"])


def test_corruption_is_detected(tmp_path):
    save_tensors(tmp_path / "ck", {"a": torch.zeros(100)})
    path = tmp_path / "ck.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="do not match the SHA-256"):
        load_tensors(tmp_path / "ck")


def test_no_temporary_files_left_behind(tmp_path):
    save_tensors(tmp_path / "ck", {"a": torch.zeros(2)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.json", "ck.safetensors"]


def test_loading_into_the_wrong_model_is_a_clear_error(tmp_path):
    save_model(tmp_path / "m", torch.nn.Linear(3, 4))
    with pytest.raises(CheckpointError, match="do not match the model"):
        load_model(tmp_path / "m", torch.nn.Linear(5, 4, bias=False))


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_tensors(tmp_path / "nothing")


def test_extra_state_round_trips_without_pickle(tmp_path):
    class Scheduled(torch.nn.Linear):
        progress = 0.0

        def get_extra_state(self):
            return {"progress": self.progress}

        def set_extra_state(self, state):
            self.progress = state["progress"]

    m = Scheduled(2, 2)
    m.progress = 0.75
    save_model(tmp_path / "m", m)
    fresh = Scheduled(2, 2)
    load_model(tmp_path / "m", fresh)
    assert fresh.progress == 0.75 and torch.equal(fresh.weight, m.weight)


def test_stems_with_dots(tmp_path):
    save_tensors(tmp_path / "slice-w0.25-d2", {"a": torch.ones(1)})
    assert (tmp_path / "slice-w0.25-d2.safetensors").exists() and (tmp_path / "slice-w0.25-d2.json").exists()
    back, _ = load_tensors(tmp_path / "slice-w0.25-d2")
    assert torch.equal(back["a"], torch.ones(1))


def _interrupt_at(monkeypatch, n_replace: int):
    """Make the ``n_replace``-th ``os.replace`` inside save_tensors raise KeyboardInterrupt."""
    import brickwork.persist as persist

    calls = {"n": 0}
    real = persist.os.replace

    def replace(src, dst):
        calls["n"] += 1
        if calls["n"] == n_replace:
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(persist.os, "replace", replace)


@pytest.mark.parametrize("cut_at, expect", [(1, "old"), (2, "old"), (3, "new")])
def test_an_interrupted_save_leaves_the_old_or_the_new_checkpoint(tmp_path, monkeypatch, cut_at, expect):
    # save_tensors renames three times: tensors -> pending, JSON into place (the commit
    # point), pending -> tensors. A Ctrl-C at any of them must not pair new tensors with old
    # metadata (which is what a resumed run tripped over before this was a two-phase commit).
    old, new = {"a": torch.zeros(4)}, {"a": torch.ones(4)}
    save_tensors(tmp_path / "ck", old, {"step": 1})
    with monkeypatch.context() as m:
        _interrupt_at(m, cut_at)
        with pytest.raises(KeyboardInterrupt):
            save_tensors(tmp_path / "ck", new, {"step": 2})
    back, meta = load_tensors(tmp_path / "ck")
    want, step = (old, 1) if expect == "old" else (new, 2)
    assert torch.equal(back["a"], want["a"]) and meta["step"] == step
    save_tensors(tmp_path / "ck", new, {"step": 3})  # a later save cleans up after the cut one
    assert {p.name for p in tmp_path.iterdir()} == {"ck.json", "ck.safetensors"}


# ----------------------------------------------- metadata, dtypes and structure checked on load


def _train_state(tmp_path, seed: int = 0):
    """A saved training state of a tiny model after one Adam step; returns (stem, model, opt)."""
    from brickwork.train.checkpoint import save_training_state

    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    opt.param_groups[0]["initial_lr"] = 0.01  # what a scheduler leaves there
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    stem = tmp_path / f"state{seed}"
    save_training_state(stem, model, opt, {"epoch": 1, "history": [{"epoch": 1}]}, bind={"seed": seed})
    return stem, model, opt


def _load_train_state(stem, seed: int = 0):
    from brickwork.train.checkpoint import load_training_state

    model = torch.nn.Linear(3, 2)
    return load_training_state(stem, model, torch.optim.Adam(model.parameters(), lr=0.01), expect={"seed": seed})


def _edit_json(stem, edit) -> None:
    import json

    path = stem.with_name(stem.name + ".json")
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m["progress"].update(epoch=3),
        lambda m: m["optimizer"]["param_groups"][0].update(initial_lr=1.0),
        lambda m: m.update(seed=1),
    ],
    ids=["progress.epoch", "initial_lr", "seed"],
)
def test_edited_metadata_is_refused(tmp_path, edit):
    stem, _, _ = _train_state(tmp_path)
    assert _load_train_state(stem)["epoch"] == 1
    _edit_json(stem, edit)
    with pytest.raises(CheckpointError, match="metadata .* changed after it was written"):
        _load_train_state(stem)


def test_another_seeds_files_are_refused(tmp_path):
    stem0, _, _ = _train_state(tmp_path, seed=0)
    stem1, _, _ = _train_state(tmp_path, seed=1)
    for suffix in (".json", ".safetensors"):  # seed 1's pair, consistent in itself, in seed 0's place
        stem0.with_name(stem0.name + suffix).write_bytes(stem1.with_name(stem1.name + suffix).read_bytes())
    with pytest.raises(CheckpointError, match="seed 1.*expected 0|seed: saved 1, expected 0"):
        _load_train_state(stem0, seed=0)


def test_legacy_checkpoint_without_metadata_hash_still_loads(tmp_path):
    stem, model, _ = _train_state(tmp_path)
    _edit_json(stem, lambda m: (m.pop("meta_sha256"), m.pop("seed"), m.update(format=1)))
    assert _load_train_state(stem)["epoch"] == 1
    save_model(tmp_path / "m", model)
    _edit_json(tmp_path / "m", lambda m: (m.pop("meta_sha256"), m.update(format=1)))
    fresh = torch.nn.Linear(3, 2)
    load_model(tmp_path / "m", fresh)
    assert torch.equal(fresh.weight, model.weight)


def test_a_removed_metadata_hash_is_refused_in_the_new_format(tmp_path):
    stem, _, _ = _train_state(tmp_path)
    _edit_json(stem, lambda m: m.pop("meta_sha256"))
    with pytest.raises(CheckpointError, match="no metadata hash"):
        _load_train_state(stem)


def _resave(stem, change) -> None:
    """Rewrite the tensors of ``stem`` with ``change`` applied, hashes recomputed (a well-formed file)."""
    tensors, meta = load_tensors(stem)
    for k in ("format", "sha256", "meta_sha256"):
        meta.pop(k)
    change(tensors)
    save_tensors(stem, tensors, meta)


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda t: t.update({"weight": t["weight"] > 0}), "torch.bool.*expected a floating"),
        (lambda t: t.update({"weight": t["weight"].long()}), "torch.int64.*expected a floating"),
        (lambda t: t["weight"].view(-1).__setitem__(0, float("nan")), "weight.*NaN or infinite"),
        (lambda t: t["bias"].view(-1).__setitem__(1, float("inf")), "bias.*NaN or infinite"),
    ],
    ids=["bool", "int", "nan", "inf"],
)
def test_bad_weight_dtypes_and_non_finite_weights_are_refused(tmp_path, change, expected):
    save_model(tmp_path / "m", torch.nn.Linear(3, 2))
    _resave(tmp_path / "m", change)
    with pytest.raises(CheckpointError, match=expected):
        load_model(tmp_path / "m", torch.nn.Linear(3, 2))


def test_non_finite_optimizer_state_is_refused(tmp_path):
    stem, _, _ = _train_state(tmp_path)
    _resave(stem, lambda t: t["optim.0.exp_avg"].view(-1).__setitem__(0, float("nan")))
    with pytest.raises(CheckpointError, match="optim.0.exp_avg.*NaN or infinite"):
        _load_train_state(stem)


def _legacy(stem, edit) -> None:
    """Edit the JSON and drop its metadata hash (as a pre-hash checkpoint): only structure checks remain."""
    _edit_json(stem, lambda m: (edit(m), m.pop("meta_sha256", None), m.update(format=1)))


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda m: m.pop("optimizer"), "no 'optimizer'"),
        (lambda m: m.pop("progress"), "no 'progress'"),
        (lambda m: m.update(optimizer=[]), "optimizer: expected a JSON object"),
        (lambda m: m["optimizer"].update(param_groups="x"), "param_groups: expected a list"),
        (lambda m: m["progress"].update(epoch="1"), "progress.epoch: expected an integer"),
        (lambda m: m["progress"].update(history={}), "progress.history: expected a list"),
        (lambda m: m.update(extra_state=[]), "extra_state: expected a JSON object"),
        (lambda m: m["optimizer"]["param_groups"][0].update(params=[7]), "optimizer state does not match"),
    ],
    ids=["no-optimizer", "no-progress", "optimizer-list", "groups-str", "epoch-str", "history", "extra", "params"],
)
def test_malformed_but_parseable_metadata_is_a_one_line_refusal(tmp_path, edit, expected):
    stem, _, _ = _train_state(tmp_path)
    _legacy(stem, edit)
    with pytest.raises(CheckpointError, match=expected):
        _load_train_state(stem)


@pytest.mark.parametrize("text", ["[]", "3", '"x"', "null", '{"format": 1, "sha256": 5}'])
def test_metadata_that_is_not_an_object_or_lacks_its_hash_is_refused(tmp_path, text):
    save_model(tmp_path / "m", torch.nn.Linear(3, 2))
    (tmp_path / "m.json").write_text(text)
    with pytest.raises(CheckpointError, match="m.json"):
        load_model(tmp_path / "m", torch.nn.Linear(3, 2))


def _mixed() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(7, 5, generator=g),
        "half": torch.randn(3, 2, generator=g).to(torch.bfloat16),
        "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 4),
    }


def _pieces(tensors, rows=3):
    """Each tensor in row chunks of ``rows`` (whole if 0-dim), as a streaming producer gives them."""
    for name, t in tensors.items():
        if t.dim() == 0 or t.shape[0] == 0:
            yield name, t
            continue
        for start in range(0, t.shape[0], rows):
            yield name, t[start : start + rows]


def test_a_streamed_save_is_a_standard_safetensors_checkpoint_equal_to_save_tensors(tmp_path):
    from safetensors.torch import load_file

    from brickwork.persist import save_tensors_streamed

    t = _mixed()
    layout = {k: (tuple(v.shape), v.dtype) for k, v in t.items()}
    save_tensors_streamed(tmp_path / "s", layout, _pieces(t), {"note": "hi"})
    save_tensors(tmp_path / "w", t, {"note": "hi"})
    streamed, meta = load_tensors(tmp_path / "s")  # its recorded hash is the file's
    plain = load_file(str(tmp_path / "s.safetensors"))  # safetensors itself reads it
    assert meta["note"] == "hi" and sorted(streamed) == sorted(t)
    for k, v in t.items():
        assert streamed[k].dtype == v.dtype and torch.equal(streamed[k], v) and torch.equal(plain[k], v)
    assert load_tensors(tmp_path / "w")[1]["note"] == "hi"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json", "s.safetensors", "w.json", "w.safetensors"]


@pytest.mark.parametrize(
    "spoil",
    [
        lambda ps: [ps[3], *ps[:3], *ps[4:]],  # a piece of the second tensor before the first's
        lambda ps: ps[:-2],  # ends early
        lambda ps: [*ps, ps[0]],  # one piece too many
        lambda ps: [(n, v.double()) if n == "w" else (n, v) for n, v in ps],  # another dtype
    ],
)
def test_a_streamed_save_that_does_not_follow_its_layout_keeps_the_old_checkpoint(tmp_path, spoil):
    from brickwork.persist import save_tensors_streamed

    t = _mixed()
    save_tensors(tmp_path / "ck", {"old": torch.ones(2)})
    layout = {k: (tuple(v.shape), v.dtype) for k, v in t.items()}
    with pytest.raises(CheckpointError, match="layout"):
        save_tensors_streamed(tmp_path / "ck", layout, spoil(list(_pieces(t))))
    back, _ = load_tensors(tmp_path / "ck")
    assert list(back) == ["old"] and sorted(p.name for p in tmp_path.iterdir()) == ["ck.json", "ck.safetensors"]


def test_a_streamed_save_interrupted_mid_way_keeps_the_old_checkpoint(tmp_path):
    from brickwork.persist import save_tensors_streamed

    t = _mixed()
    save_tensors(tmp_path / "ck", {"old": torch.ones(2)})

    def cut():
        ps = _pieces(t)
        yield next(ps)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_tensors_streamed(tmp_path / "ck", {k: (tuple(v.shape), v.dtype) for k, v in t.items()}, cut())
    assert list(load_tensors(tmp_path / "ck")[0]) == ["old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.json", "ck.safetensors"]


# ------------------------------------------------- paths, formats and messages, in the process


def test_a_stem_may_be_given_with_either_files_suffix_and_nested_folders_are_made(tmp_path):
    from brickwork.persist import atomic_write_text

    save_tensors(tmp_path / "a" / "b" / "ck.safetensors", {"x": torch.ones(2)})
    save_tensors(tmp_path / "c" / "d" / "m.json", {"x": torch.zeros(1)})
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["ck.json", "ck.safetensors"]
    assert sorted(p.name for p in (tmp_path / "c" / "d").iterdir()) == ["m.json", "m.safetensors"]
    assert torch.equal(load_tensors(tmp_path / "a" / "b" / "ck.json")[0]["x"], torch.ones(2))
    atomic_write_text(tmp_path / "e" / "f" / "note.txt", "hi")
    assert (tmp_path / "e" / "f" / "note.txt").read_text() == "hi"


def test_metadata_json_is_indented_with_sorted_keys_and_its_digest_input_is_canonical(tmp_path):
    from pathlib import Path

    from brickwork.persist import canonical_json, write_json

    write_json(tmp_path / "m.json", {"b": 1, "a": [1, 2]})
    assert (tmp_path / "m.json").read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    # The bytes meta_sha256 hashes: sorted keys, no spaces, ASCII escapes, paths as text. A change
    # here would refuse every checkpoint written before it.
    assert canonical_json({"b": [1, 2], "a": "é", "p": Path("x/y")}) == b'{"a":"\\u00e9","b":[1,2],"p":"x/y"}'


def test_metadata_that_cannot_be_json_names_the_file(tmp_path):
    from brickwork.persist import write_json

    with pytest.raises(Exception, match=r"m\.json"):
        write_json(tmp_path / "m.json", {"x": object()})
    assert not (tmp_path / "m.json").exists()


def _streamed_save(stem, tensors, meta=None):
    from brickwork.persist import save_tensors_streamed

    return save_tensors_streamed(
        stem, {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}, tensors.items(), meta
    )


@pytest.mark.parametrize("save", [save_tensors, _streamed_save], ids=["save_tensors", "streamed"])
def test_a_ctrl_c_just_after_a_rename_is_still_a_ctrl_c(tmp_path, monkeypatch, save):
    # The signal can land after os.replace returned but before the save leaves its try block:
    # the temporary is gone by then, and cleaning it up must not turn the Ctrl-C into another error.
    import brickwork.persist as persist

    save_tensors(tmp_path / "ck", {"a": torch.zeros(2)}, {"step": 1})
    for n in (1, 2):  # tensors -> pending; the JSON into place
        calls = {"n": 0}
        real = persist.os.replace

        def replace(src, dst, real=real, calls=calls, n=n):
            calls["n"] += 1
            real(src, dst)
            if calls["n"] == n:
                raise KeyboardInterrupt

        with monkeypatch.context() as m:
            m.setattr(persist.os, "replace", replace)
            with pytest.raises(KeyboardInterrupt):
                save(tmp_path / "ck", {"a": torch.ones(2)}, {"step": 2})
        back, meta = load_tensors(tmp_path / "ck")
        assert (back["a"].sum().item(), meta["step"]) == ((0.0, 1) if n == 1 else (2.0, 2))


def test_a_failed_write_is_the_os_error_naming_the_checkpoint(tmp_path, monkeypatch):
    # safetensors reports I/O failures as its own error with "(os error N)"; save_tensors turns it
    # into the OSError it is, naming the checkpoint (not the temporary), and keeps the old one.
    import errno

    import brickwork.persist as persist

    save_tensors(tmp_path / "ck", {"a": torch.zeros(2)})
    real = persist.save_file
    monkeypatch.setattr(persist, "save_file", lambda t, tmp: real(t, f"{tmp}/under-a-file"))  # ENOTDIR
    with pytest.raises(OSError) as caught:
        save_tensors(tmp_path / "ck", {"a": torch.ones(2)})
    e = caught.value
    assert type(e) is NotADirectoryError and e.errno == errno.ENOTDIR
    assert e.strerror == "Not a directory" and e.filename == str(tmp_path / "ck.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.json", "ck.safetensors"]
    assert torch.equal(load_tensors(tmp_path / "ck")[0]["a"], torch.zeros(2))


def test_load_errors_name_the_file_and_what_was_expected(tmp_path):
    from brickwork.persist import read_meta

    save_tensors(tmp_path / "ck", {"a": torch.zeros(2)})
    (tmp_path / "ck.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"ck\.safetensors: contents do not match the SHA-256 recorded in ck\.json; "
        "the file is corrupt or was changed after it was written$",
    ):
        load_tensors(tmp_path / "ck")
    with pytest.raises(CheckpointError, match=r"ck\.safetensors: not a readable safetensors file \("):
        load_tensors(tmp_path / "ck", verify=False)
    (tmp_path / "ck.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"ck\.safetensors: weights file not found \(metadata is at .*ck\.json\)"):
        load_tensors(tmp_path / "ck")
    (tmp_path / "ck.json").write_text("{\n  oops")
    with pytest.raises(CheckpointError, match=r"ck\.json: not valid JSON \(.* at line 2\)"):
        read_meta(tmp_path / "ck")
    (tmp_path / "ck.json").write_text("[1]")
    with pytest.raises(
        CheckpointError, match=r"ck\.json: expected a JSON object of checkpoint metadata, got a JSON list"
    ):
        read_meta(tmp_path / "ck")


def test_read_meta_verifies_by_default_and_load_tensors_can_skip_it(tmp_path):
    from brickwork.persist import read_meta

    save_tensors(tmp_path / "ck", {"a": torch.ones(2)}, {"step": 1})
    _edit_json(tmp_path / "ck", lambda m: m.update(step=5))
    with pytest.raises(
        CheckpointError,
        match=r"ck\.json: the metadata does not match its SHA-256 \(key 'meta_sha256'\); "
        r"it was changed after it was written \(or belongs to other tensors\)$",
    ):
        read_meta(tmp_path / "ck")
    back, meta = load_tensors(tmp_path / "ck", verify=False)  # the caller asked not to check
    assert meta["step"] == 5 and torch.equal(back["a"], torch.ones(2))
    _edit_json(tmp_path / "ck", lambda m: m.pop("meta_sha256"))
    with pytest.raises(
        CheckpointError,
        match=r"ck\.json: format 2 but no metadata hash \(key 'meta_sha256'\); "
        "the metadata was changed after it was written$",
    ):
        read_meta(tmp_path / "ck")


def test_legacy_metadata_binds_the_keys_it_has(tmp_path):
    from brickwork.persist import read_meta

    save_tensors(tmp_path / "ck", {"a": torch.ones(2)}, {"seed": 1})
    _edit_json(tmp_path / "ck", lambda m: (m.pop("meta_sha256"), m.pop("format")))  # the oldest files
    assert read_meta(tmp_path / "ck", expect={"seed": 1, "run": "r1"})["seed"] == 1  # no 'run': not bound
    for expect in ({"seed": 0}, {"run": "r1", "seed": 0}):  # a key it has must match, after one it lacks
        with pytest.raises(
            CheckpointError,
            match=r"ck\.json: seed: saved 1, expected 0; "
            "these checkpoint files belong to another run, model or seed$",
        ):
            read_meta(tmp_path / "ck", expect=expect)


def test_a_streamed_file_in_safetensors_order_is_byte_identical_to_save_file(tmp_path):
    # safetensors orders tensors by alignment, then name; given that order the streamed writer's
    # header (compact JSON, padded with spaces to 8 bytes) and data are exactly save_file's.
    from safetensors.torch import save_file

    from brickwork.persist import save_tensors_streamed

    g = torch.Generator().manual_seed(0)
    t = {
        "ids": torch.arange(6).reshape(2, 3),
        "a": torch.randn(3, 4, generator=g),
        "w": torch.randn(5, generator=g),
        "half": torch.randn(3, generator=g).to(torch.float16),
    }
    save_file(t, str(tmp_path / "ref.safetensors"))
    save_tensors_streamed(
        tmp_path / "deep" / "er" / "s", {k: (tuple(v.shape), v.dtype) for k, v in t.items()}, _pieces(t, 2)
    )
    assert (tmp_path / "deep" / "er" / "s.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_a_streamed_save_refuses_a_dtype_safetensors_cannot_store(tmp_path):
    from brickwork.persist import save_tensors_streamed

    layout = {"w": ((2,), torch.float32), "z": ((2,), torch.complex64)}
    with pytest.raises(
        CheckpointError, match=r"s\.safetensors: tensor 'z' has dtype torch\.complex64, which safetensors"
    ):
        save_tensors_streamed(tmp_path / "s", layout, [])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "layout, pieces, at",
    [
        ({"a": ((4,), torch.float32), "b": ((4,), torch.float32)}, [("b", torch.ones(4))], "'a'"),  # same dtype, size
        ({}, [("x", torch.ones(1))], "'(no tensor)'"),  # nothing expected at all
    ],
    ids=["other-tensor", "empty-layout"],
)
def test_a_streamed_piece_of_another_tensor_is_refused_naming_the_expected_one(tmp_path, layout, pieces, at):
    import re

    from brickwork.persist import save_tensors_streamed

    want = f"s.safetensors: a piece of '{pieces[0][0]}' does not follow the layout (at {at})"
    with pytest.raises(CheckpointError, match=re.escape(want)):
        save_tensors_streamed(tmp_path / "s", layout, pieces)
    assert list(tmp_path.iterdir()) == []
