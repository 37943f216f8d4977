"""Image datasets: shapes, ranges, deterministic disjoint splits, the idx reader."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from brickwork.data import images, split_indices
from brickwork.errors import DataError


@pytest.mark.parametrize(
    ("loader", "raw", "n", "hw", "scale"),
    [
        (images.digits, images._digits_raw, 1797, 8, 16.0),
        (images.mnist5k, images._mnist5k_raw, 5000, 28, 255.0),
    ],
)
def test_random_split_images(loader, raw, n, hw, scale) -> None:
    ds = loader(val_fraction=0.1, test_fraction=0.2, seed=3)
    assert ds.task == "classify" and ds.in_shape == (1, hw, hw)
    assert ds.num_classes == 10 and ds.classes == [str(i) for i in range(10)]
    assert len(ds.train) + len(ds.val) + len(ds.test) == n
    assert (len(ds.val), len(ds.test)) == (round(n * 0.1), round(n * 0.2))
    for split in (ds.train, ds.val, ds.test):
        assert split.x.dtype == torch.float32 and split.x.shape[1:] == (1, hw, hw)
        assert split.y.dtype == torch.int64 and split.y.shape == (len(split),)
        assert 0 <= split.x.min() and split.x.max() <= 1
        assert set(split.y.tolist()) <= set(range(10))
    assert ds.train.x.max() == 1  # scaled by the true pixel maximum
    # The splits are exactly the seeded index split of the raw data: disjoint by index.
    x, y, _ = raw()
    for split, idx in zip((ds.train, ds.val, ds.test), split_indices(n, 0.1, 0.2, 3), strict=False):
        assert torch.equal(split.y, y[idx])
        assert torch.equal(split.x, x[idx].float().unsqueeze(1) / scale)


def test_split_indices_disjoint_and_seeded() -> None:
    tr, va, te = split_indices(100, 0.1, 0.2, seed=0)
    assert sorted(torch.cat([tr, va, te]).tolist()) == list(range(100))
    assert (len(tr), len(va), len(te)) == (70, 10, 20)
    assert all(torch.equal(a, b) for a, b in zip(split_indices(100, 0.1, 0.2, 0), (tr, va, te), strict=False))
    assert not torch.equal(split_indices(100, 0.1, 0.2, 1)[0], tr)


def test_digits_deterministic() -> None:
    a, b, c = (images.digits(seed=s) for s in (0, 0, 1))
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    assert not torch.equal(a.train.y, c.train.y)


def test_fractions_leave_no_train() -> None:
    with pytest.raises(DataError, match="val_fraction \\+ test_fraction must be below 1"):
        images.digits(val_fraction=0.5, test_fraction=0.5, seed=0)


def _write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_read_idx_roundtrip_and_errors(tmp_path) -> None:
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a-idx3-ubyte.gz", a)
    assert np.array_equal(images.read_idx(tmp_path / "a-idx3-ubyte.gz"), a)
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]))
    with pytest.raises(DataError, match="short: idx file holds 10 bytes, expected 13"):
        images.read_idx(tmp_path / "short")
    (tmp_path / "junk").write_bytes(b"hello world")
    with pytest.raises(DataError, match="junk: not an idx file"):
        images.read_idx(tmp_path / "junk")


def test_fashion_mnist_missing_package_says_how_to_install(monkeypatch) -> None:
    monkeypatch.setattr(images, "fashion_mnist_dir", lambda: None)
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        images._fashion_raw.__wrapped__()  # bypass the in-process cache


@pytest.mark.skipif(
    images.fashion_mnist_dir() is None,
    reason="Debian package dataset-fashion-mnist is not installed (apt-get install -y dataset-fashion-mnist)",
)
def test_fashion_mnist_official_test_and_limit() -> None:
    ds = images.fashion_mnist(val_fraction=0.1, limit_train=300, seed=0)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (270, 30, 10_000)
    assert ds.in_shape == (1, 28, 28) and ds.num_classes == 10 and ds.classes[9] == "Ankle boot"
    assert ds.test.x.dtype == torch.float32 and 0 <= ds.test.x.min() and ds.test.x.max() <= 1
    assert torch.bincount(ds.test.y).tolist() == [1000] * 10  # the official balanced test set
    again = images.fashion_mnist(val_fraction=0.1, limit_train=300, seed=0)
    other = images.fashion_mnist(val_fraction=0.1, limit_train=300, seed=1)
    assert torch.equal(ds.train.x, again.train.x) and torch.equal(ds.val.y, again.val.y)
    assert not torch.equal(ds.train.x, other.train.x)
    assert torch.equal(ds.test.x, other.test.x)
    # train and val are disjoint: no training image appears in val
    flat_tr, flat_va = ds.train.x.flatten(1), ds.val.x.flatten(1)
    assert not (flat_va[:, None, :] == flat_tr[None, :, :]).all(-1).any()
