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


def teacher_cache(tmp_path_factory):
    """A module's auxiliaries/teacher cache, filled once for TINY_BASE (no arm changes what the teacher depends
    on), so the tests time runs, not the first training of the shared networks. Use as
    ``shared_cache = pytest.fixture(scope="module", autouse=True)(teacher_cache)``."""
    import os
    import subprocess
    import sys

    cache = tmp_path_factory.mktemp("tfl-cache")
    old = os.environ.get("TWINFLOW_LAB_CACHE")
    os.environ["TWINFLOW_LAB_CACHE"] = str(cache)
    base = cache / "base.yaml"
    base.write_text(TINY_BASE)
    subprocess.run([sys.executable, "-m", "twinflow_train.cli", "teacher", "--config", str(base), "--no-progress"],
                   cwd=Path(__file__).resolve().parents[2], check=True, capture_output=True, timeout=900)
    yield cache
    if old is None:
        os.environ.pop("TWINFLOW_LAB_CACHE", None)
    else:
        os.environ["TWINFLOW_LAB_CACHE"] = old
