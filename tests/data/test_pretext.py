"""Rotation prediction built from other datasets' training images: exact turns, labels, splits."""

import pytest
import torch

from brickwork.data import load_dataset
from brickwork.data.pretext import rotated
from brickwork.errors import DataError


def test_rotated_rows_are_the_quarter_turns():
    x = torch.arange(2 * 1 * 3 * 3, dtype=torch.float32).reshape(2, 1, 3, 3)
    x4, y4 = rotated(x)
    assert y4.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert torch.equal(x4[0], x[0]) and torch.equal(x4[6], x[1].flip(1).flip(2))  # two turns: both axes flipped
    assert torch.equal(x4[1, 0], x[0, 0].T.flip(0))  # one turn counter-clockwise


def test_dataset_holds_only_the_sources_training_images_each_with_its_four_turns():
    ds = load_dataset("rotations", sources=[{"name": "digits"}], val_fraction=0.2, test_fraction=0.2, seed=1)
    train = load_dataset("digits", seed=1).train.x
    for s in (ds.train, ds.val, ds.test):
        assert len(s.y) % 4 == 0 and s.y.tolist() == [0, 1, 2, 3] * (len(s.y) // 4)
        upright = s.x[0::4]
        assert torch.equal(s.x[1::4], torch.rot90(upright, 1, dims=(2, 3)))
    total = len(ds.train.y) + len(ds.val.y) + len(ds.test.y)
    assert total == 4 * len(train)  # nothing from digits' own val or test split
    pooled = torch.cat([ds.train.x[0::4], ds.val.x[0::4], ds.test.x[0::4]])
    assert torch.equal(pooled.flatten(1).sum(0), train.flatten(1).sum(0))  # the same images
    assert ds.num_classes == 4 and ds.in_shape == (1, 8, 8)


def test_sources_must_share_a_square_shape():
    with pytest.raises(DataError, match=r"sources\[1\] \(mnist5k\) has inputs \(1, 28, 28\), the first \(1, 8, 8\)"):
        load_dataset("rotations", sources=[{"name": "digits"}, {"name": "mnist5k"}], seed=0)
    with pytest.raises(DataError, match=r"sources\[0\] needs the name of another dataset"):
        load_dataset("rotations", sources=[{"limit": 3}], seed=0)
