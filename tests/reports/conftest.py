"""Fixtures of the reports tests: synthetic grids (tables in memory, and run directories on disk)."""

from __future__ import annotations

from pathlib import Path

import pytest

from reports.data import prepare
from reports.synthetic import synthetic_grid_frames, write_synthetic_grid

ARMS = ["vanilla", "renoise", "rl_hard"]
SEEDS = [0, 1, 2]


@pytest.fixture
def small_data():
    metrics, statuses = synthetic_grid_frames(arms=ARMS, seeds=SEEDS, steps=200, log_every=5, val_every=40,
                                              diverge={("rl_hard", 2): 130})
    return prepare(name="small", metrics=metrics, statuses=statuses)


@pytest.fixture(scope="session")
def disk_grid(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("grids")
    return write_synthetic_grid(root / "synth", arms=ARMS, seeds=SEEDS, steps=200, log_every=5, val_every=40,
                                diverge={("rl_hard", 2): 130})
