"""Shared fixtures: a tiny config on real data (digits), a fresh run store per test."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

TINY: dict[str, Any] = {
    "name": "tiny",
    "seed": 0,
    "data": {"name": "digits"},
    "models": {"mlp": {"name": "mlp", "width": 32, "depth": 2, "dropout": 0.1}},
    "stages": [
        {"stage": "train", "epochs": 3, "batch_size": 64, "lr": 0.01},
        {"stage": "evaluate", "latency_repeats": 1},
    ],
}


@pytest.fixture
def tiny_config() -> dict[str, Any]:
    return copy.deepcopy(TINY)


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    return tmp_path / "runs"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
