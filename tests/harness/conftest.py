from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

# Small enough that a run is seconds on one core, but every part of the pipeline is real:
# codec, reward and eval nets, teacher, validation, sample metrics, checkpoints.
TINY_BASE = """\
run: {steps: 24, log_every: 1, val_every: 8, ckpt_every: 8}
data: {batch_size: 32}
codec: {steps: 60, hidden: 16}
aux: {reward_steps: 60, eval_steps: 60}
model: {hidden: 64, depth: 2, time_dim: 16}
teacher: {steps: 60, batch_size: 64, sample_steps: 4}
eval: {n_samples: 20, nfe: [1]}
"""


@pytest.fixture
def write(tmp_path: Path):
    """write(name, text) -> path, dedented, under tmp_path."""

    def _write(name: str, text: str) -> Path:
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))
        return p

    return _write


@pytest.fixture
def tiny_base(write) -> Path:
    return write("base.yaml", TINY_BASE)
