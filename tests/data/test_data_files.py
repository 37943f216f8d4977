"""The user's own data files: npz and csv loading, label mapping, and every error message."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brickwork.data import check_file, load_dataset
from brickwork.data.files import csv, npz
from brickwork.errors import DataError


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def test_npz_shapes_labels_and_determinism() -> None:
    rng = np.random.default_rng(0)
    np.savez("d.npz", x=rng.random((50, 3, 4)), y=np.array([7, -3] * 25))
    ds = npz(path="d.npz", seed=0)
    assert ds.task == "classify" and ds.in_shape == (3, 4) and ds.num_classes == 2
    assert ds.classes == ["-3", "7"] and ds.name == "d.npz"
    assert (len(ds.train), len(ds.val), len(ds.test)) == (35, 5, 10)
    assert ds.train.x.dtype == torch.float32 and ds.train.y.dtype == torch.int64
    assert set(torch.cat([ds.train.y, ds.val.y, ds.test.y]).tolist()) == {0, 1}
    rows = torch.cat([ds.train.x, ds.val.x, ds.test.x]).flatten(1)
    assert len({tuple(r) for r in rows.tolist()}) == 50  # every sample once: disjoint splits
    same, other = npz(path="d.npz", seed=0), npz(path="d.npz", seed=1)
    assert torch.equal(ds.train.x, same.train.x) and not torch.equal(ds.train.x, other.train.x)


def test_csv_features_and_text_labels() -> None:
    with open("iris.csv", "w") as f:
        f.write("a,species,b\n1,virginica,2\n\n3, setosa ,4.5\n5,virginica,6\n7,setosa,8\n")
    ds = csv(path="iris.csv", label="species", val_fraction=0.25, test_fraction=0.25, seed=0)
    assert ds.classes == ["setosa", "virginica"] and ds.in_shape == (2,)
    x = torch.cat([ds.train.x, ds.val.x, ds.test.x])
    y = torch.cat([ds.train.y, ds.val.y, ds.test.y])
    assert sorted(zip(x[:, 0].tolist(), x[:, 1].tolist(), y.tolist(), strict=False)) == [
        (1, 2, 1),
        (3, 4.5, 0),
        (5, 6, 1),
        (7, 8, 0),
    ]


def test_csv_integer_labels_sorted_numerically() -> None:
    with open("n.csv", "w") as f:
        f.write("f;y\n" + "".join(f"{i};{lab}\n" for i, lab in enumerate([10, 2, 2, 10, 33])))
    ds = csv(path="n.csv", label="y", delimiter=";", val_fraction=0.0, test_fraction=0.0, seed=0)
    assert ds.classes == ["2", "10", "33"]
    assert sorted(zip(ds.train.x[:, 0].tolist(), ds.train.y.tolist(), strict=False)) == [
        (0, 1),
        (1, 0),
        (2, 0),
        (3, 1),
        (4, 2),
    ]


def test_load_dataset_by_name() -> None:
    # brickwork.data registers its own datasets; nothing above it needs loading.
    np.savez("d.npz", x=np.zeros((10, 2)), y=np.arange(10) % 2)
    assert load_dataset("npz", seed=0, path="d.npz").in_shape == (2,)
    assert load_dataset("digits", seed=0).in_shape == (1, 8, 8)


# ------------------------------------------------------------------------ error messages


def _error(loader, **kw) -> str:
    with pytest.raises(DataError) as info:
        loader(seed=0, **kw)
    return str(info.value)


def test_missing_file_names_path_and_cwd(tmp_path) -> None:
    msg = _error(npz, path="nope.npz")
    assert "data file not found: nope.npz" in msg and str(tmp_path) in msg
    assert "relative path resolves against the current directory" in msg
    assert "data file not found" in _error(csv, path="nope.csv", label="y")
    with pytest.raises(DataError, match="not found"):
        check_file("nope.npz")
    with pytest.raises(DataError, match="not a file"):
        check_file(".")


def test_empty_file() -> None:
    open("e.npz", "w").close()
    open("e.csv", "w").close()
    assert "data file is empty: e.npz" in _error(npz, path="e.npz")
    assert "data file is empty: e.csv" in _error(csv, path="e.csv", label="y")


def test_npz_not_an_archive() -> None:
    with open("t.npz", "w") as f:
        f.write("a,b\n1,2\n")
    assert "t.npz: not an .npz archive" in _error(npz, path="t.npz")
    np.save("one.npy", np.zeros(3))
    assert "one.npy: is a single-array .npy file" in _error(npz, path="one.npy")


def test_npz_missing_arrays_lists_present_ones() -> None:
    np.savez("m.npz", features=np.zeros((3, 2)), y=np.zeros(3))
    msg = _error(npz, path="m.npz")
    assert "missing array(s) x; the file has features, y" in msg and "numpy.savez" in msg


def test_npz_mismatched_lengths_and_bad_arrays() -> None:
    np.savez("l.npz", x=np.zeros((3, 2)), y=np.zeros(4))
    assert "x has 3 samples but y has 4" in _error(npz, path="l.npz")
    np.savez("o.npz", x=np.array([{}, 1], dtype=object), y=np.zeros(2))
    assert "cannot read arrays x/y" in _error(npz, path="o.npz")  # pickle is refused
    np.savez("f.npz", x=np.zeros((2, 1)), y=np.array([0.5, 1.0]))
    assert "labels are fractional numbers" in _error(npz, path="f.npz")
    np.savez("v.npz", x=np.zeros(4), y=np.zeros(4))
    assert "x has shape (4,); expected (N, ...)" in _error(npz, path="v.npz")


def test_csv_label_column_missing_suggests_close_names() -> None:
    with open("c.csv", "w") as f:
        f.write("sepal,Species\n1,a\n")
    msg = _error(csv, path="c.csv", label="species")
    assert "no label column 'species'" in msg and "did you mean 'Species'" in msg


def test_csv_non_numeric_feature_names_line_and_column() -> None:
    with open("c.csv", "w") as f:
        f.write("sepal,petal,label\n1,2,a\n3,wide,b\n")
    msg = _error(csv, path="c.csv", label="label")
    assert "line 3, column 'petal': 'wide' is not a number" in msg


def test_csv_ragged_row_and_no_rows() -> None:
    with open("r.csv", "w") as f:
        f.write("a,b,label\n1,2,x\n3\n")
    assert "line 3 has 1 field(s); expected 3" in _error(csv, path="r.csv", label="label")
    with open("h.csv", "w") as f:
        f.write("a,label\n")
    assert "has a header but no data rows" in _error(csv, path="h.csv", label="label")


# ------------------------------------------------- values that change meaning when cast


def test_npz_features_are_checked_after_the_cast_to_float32() -> None:
    # 1e300 is finite in float64 but inf in float32: it must be refused, not trained on as inf.
    x = np.zeros((4, 3))
    x[2, 1] = 1e300
    np.savez("big.npz", x=x, y=np.arange(4) % 2)
    msg = _error(npz, path="big.npz")
    assert "big.npz" in msg and "x[2, 1]" in msg and "float32" in msg
    x[2, 1] = np.nan
    np.savez("nan.npz", x=x, y=np.arange(4) % 2)
    assert "x[2, 1]" in _error(npz, path="nan.npz")


def test_npz_labels_that_merge_in_the_cast_to_int64_are_refused() -> None:
    # 1e20 and 1e20 + 2**40 are distinct float64 values; both overflow int64 and would merge.
    y = np.array([0.0, 1e20, 1e20 + 2**40, 0.0])
    np.savez("collide.npz", x=np.zeros((4, 2)), y=y)
    msg = _error(npz, path="collide.npz")
    assert "collide.npz" in msg and "y[1]" in msg and "int64" in msg


def test_npz_fractional_and_non_finite_labels_name_the_first_bad_index() -> None:
    np.savez("frac.npz", x=np.zeros((3, 1)), y=np.array([1.0, 2.0, 2.5]))
    msg = _error(npz, path="frac.npz")
    assert "y[2]" in msg and "fractional" in msg
    np.savez("nanlab.npz", x=np.zeros((3, 1)), y=np.array([1.0, np.nan, 2.0]))
    assert "y[1]" in _error(npz, path="nanlab.npz")


def test_npz_integral_float_labels_still_work() -> None:
    np.savez("ok.npz", x=np.zeros((4, 1)), y=np.array([3.0, -1.0, 3.0, 2.0**62]))
    assert npz(path="ok.npz", seed=0, val_fraction=0.0, test_fraction=0.0).classes == ["-1", "3", str(2**62)]


def test_csv_cell_that_overflows_float32_names_line_and_column() -> None:
    with open("big.csv", "w") as f:
        f.write("a,b,label\n1,2,x\n3,1e300,y\n")
    msg = _error(csv, path="big.csv", label="label")
    assert "line 3, column 'b'" in msg and "float32" in msg
    with open("nan.csv", "w") as f:
        f.write("a,label\nnan,x\n")
    assert "line 2, column 'a'" in _error(csv, path="nan.csv", label="label")


def test_csv_integer_label_beyond_int64_names_line_and_column() -> None:
    with open("huge.csv", "w") as f:
        f.write("a,label\n1,3\n2,100000000000000000000\n")
    msg = _error(csv, path="huge.csv", label="label")
    assert "line 3, column 'label'" in msg and "int64" in msg
