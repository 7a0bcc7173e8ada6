"""Forks through the harness: a child arm starts from its source arm's state where the two share steps,
and ends as it would have from step 0; the shared prefix is read from the source's own records."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from harness.collect import collect_grid, run_statuses
from harness.forks import plan_forks
from harness.grid import run_grid
from harness.launchers import LocalLauncher, SlurmLauncher, TorchrunLauncher
from harness.matrix import load_matrix

from .conftest import TINY_BASE, teacher_cache

pytestmark = pytest.mark.slow
# b switches a hard RL term on at step 9: its first 8 steps are a's, bit for bit
BODY = """\
seeds: [0]
overrides: {run.steps: 16, run.val_every: 8, run.ckpt_every: 8}
arms:
  a: {}
  b: {extends: a, rl.enabled: true, rl.reward: digits, rl.schedule: hard, rl.warmup: 9}
"""


shared_cache = pytest.fixture(scope="module", autouse=True)(teacher_cache)


def _grid(tmp_path: Path, root: str):
    (tmp_path / "base.yaml").write_text(TINY_BASE)
    m = tmp_path / "f.yaml"
    m.write_text("name: f\nbase: base.yaml\n" + BODY)
    return load_matrix(m, root=tmp_path / root, code_version="test")


def _records(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_forked_child_equals_the_child_trained_from_step_0(tmp_path):
    grid = _grid(tmp_path, "forked")
    assert {a: (f.source, f.step) for a, f in plan_forks(grid).items()} == {"b": ("a", 8)}
    out = io.StringIO()
    res = run_grid(grid, launcher=LocalLauncher(workers=2), stream=out, tty=False)
    assert res.exit_code == 0, out.getvalue()[-3000:]
    assert res.steps_computed == 16 + 8  # b trained its last 8 steps only
    scratch = _grid(tmp_path, "scratch")
    res2 = run_grid(scratch, launcher=LocalLauncher(workers=2), stream=io.StringIO(), tty=False, forks=False)
    assert res2.exit_code == 0 and res2.steps_computed == 32
    child, alone = grid.grid_dir / "b" / "seed-0", scratch.grid_dir / "b" / "seed-0"
    fork = json.loads((child / "fork.json").read_text())
    assert fork["step"] == 8 and fork["parent"] == "../../a/seed-0" and "fallback" not in fork
    assert not (alone / "fork.json").exists()
    # the records after the fork, the sample files and the best weights are the from-scratch run's
    after = [r for r in _records(child) if r.get("kind") != "event"]
    assert after and after == [r for r in _records(alone) if r["step"] > 8 and r.get("kind") != "teacher"]
    for name in ("final-nfe1.npz", "best-nfe1.npz"):
        with np.load(child / "samples" / name) as x, np.load(alone / "samples" / name) as y:
            assert all(np.array_equal(x[k], y[k]) for k in x.files)
    # the shared prefix comes from a's own file, flagged, and reads like the from-scratch run's prefix
    df = collect_grid(grid.grid_dir)
    b = df[df["arm"] == "b"]
    shared = b[b["fork/shared"] == 1.0]
    assert sorted(set(shared["step"])) == list(range(0, 9))
    own = df[df["arm"] == "a"]
    key = "loss/main"
    assert np.array_equal(shared.loc[shared["kind"] == "train", key].to_numpy(),
                          own.loc[(own["kind"] == "train") & (own["step"] <= 8), key].to_numpy())
    st = run_statuses(grid.grid_dir).set_index("arm")
    assert st.loc["b", "fork"] == "a/seed-0 after step 8" and st.loc["a", "fork"] != st.loc["a", "fork"]  # NaN


def test_a_corrupt_source_checkpoint_makes_the_child_train_from_step_0_and_say_why(tmp_path):
    grid = _grid(tmp_path, "runs")
    assert run_grid(grid, launcher=LocalLauncher(workers=1), stream=io.StringIO(), tty=False).exit_code == 0
    child = grid.grid_dir / "b" / "seed-0"
    ckpt = grid.grid_dir / "a" / "seed-0" / "checkpoints" / "fork-8"
    victim = max((p for p in ckpt.rglob("*") if p.is_file() and p.name != "meta.json"), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    import shutil

    shutil.rmtree(child)
    res = run_grid(_grid(tmp_path, "runs"), launcher=LocalLauncher(workers=1), stream=io.StringIO(), tty=False)
    assert res.outcomes["b/seed-0"] == "done"
    fork = json.loads((child / "fork.json").read_text())
    assert "fallback" in fork and fork["step"] == 8
    train = [r for r in _records(child) if r.get("kind") == "train"]
    assert train[0]["step"] == 1  # trained from step 0


@pytest.mark.distributed
def test_forks_under_torchrun(tmp_path):
    grid = _grid(tmp_path, "tr")
    res = run_grid(grid, launcher=TorchrunLauncher(workers=1, nproc_per_node=2), stream=io.StringIO(), tty=False)
    child = grid.grid_dir / "b" / "seed-0"
    assert res.outcomes == {"a/seed-0": "done", "b/seed-0": "done"}, (child / "logs" / "attempt-1.log").read_text()[-3000:]
    fork = json.loads((child / "fork.json").read_text())
    assert fork["step"] == 8 and "fallback" not in fork


def test_forks_through_submitit(tmp_path):
    grid = _grid(tmp_path, "sl")
    launcher = SlurmLauncher(folder=grid.grid_dir / ".harness" / "submitit", workers=1, cluster="local")
    res = run_grid(grid, launcher=launcher, stream=io.StringIO(), tty=False)
    child = grid.grid_dir / "b" / "seed-0"
    assert res.outcomes == {"a/seed-0": "done", "b/seed-0": "done"}, (child / "logs" / "attempt-1.log").read_text()[-3000:]
    fork = json.loads((child / "fork.json").read_text())
    assert fork["step"] == 8 and "fallback" not in fork
