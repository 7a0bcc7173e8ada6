"""Shared fixtures: a tiny digits setup whose auxiliaries and teacher are trained once per session."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from twinflow_train.config import load_config

TINY = [
    "codec.steps=300", "aux.reward_steps=300", "aux.eval_steps=300", "aux.proxy_steps=300",
    "teacher.steps=400", "teacher.batch_size=128",
    "model.hidden=64", "model.depth=2", "model.time_dim=32",
    "data.batch_size=32", "eval.n_samples=50", "eval.nfe=[1,2]",
    "run.steps=12", "run.log_every=1", "run.val_every=6", "run.ckpt_every=4",
]


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cache")
    return root


@pytest.fixture(scope="session")
def tiny_overrides(tiny_cache) -> list[str]:
    over = TINY + [f"aux.cache_dir={tiny_cache}"]
    from twinflow_train.assets.teacher import get_teacher
    get_teacher(load_config(None, over), progress=False)
    return over


def run_cli(args: list[str], *, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "twinflow_train.cli", *args], capture_output=True, text=True,
                          env=e, timeout=timeout)


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` as a module (the benchmarks are scripts, not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
