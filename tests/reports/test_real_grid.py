"""A report of a real (tiny) grid: 2 arms x 2 seeds of 20-step digits runs, launched by the harness.

Arms: vanilla TwinFlow, and dynamic renoise + RL switched on at step 8 (so the per-term
gradient telemetry and the schedules are real too).

The auxiliaries and the teacher get a few dozen steps: the report's numbers only have to be
real and checkable, not good.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from reports.build import build_report

from .checks import check_report

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
ARMS = ["vanilla", "rl_hard"]  # matrix order; the run directories sort the other way
NFE = [1, 2, 4]
MATRIX = """\
name: tiny
base: {base}
seeds: [0, 1]
overrides:
  codec.steps: 60
  aux.reward_steps: 60
  aux.eval_steps: 60
  aux.cache_dir: {cache}
  teacher.steps: 60
  teacher.batch_size: 64
  model.hidden: 64
  model.depth: 2
  model.time_dim: 32
  data.batch_size: 32
  eval.n_samples: 20
  eval.nfe: [1, 2, 4]
  run.steps: 20
  run.log_every: 1
  run.val_every: 5
  run.ckpt_every: 10
arms:
  vanilla: {{}}
  rl_hard:
    renoise.schedule: blog_linear
    renoise.start: 4.0
    renoise.end: 1.0
    renoise.steps: 10
    rl.enabled: true
    rl.reward: digits
    rl.schedule: hard
    rl.warmup: 8
"""


@pytest.fixture(scope="module")
def real_grid(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("real")
    matrix = root / "tiny.yaml"
    matrix.write_text(MATRIX.format(base=REPO / "configs" / "digits.yaml", cache=root / "cache"))
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "grid", "run", str(matrix), "--root",
                           str(root / "runs"), "--workers", "2"], cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root / "runs" / "tiny"


def test_report_of_a_real_grid(real_grid, tmp_path):
    html = build_report(grid_dir=real_grid, out_dir=tmp_path, n_boot=1000, progress=False)
    # the arm order comes from the matrix file (named in each run's harness.json), not from the directory names
    check_report(real_grid, tmp_path, arms=ARMS, nfe=NFE)
    md = (tmp_path / "report.md").read_text()
    assert "Arm order: vanilla, rl_hard (source: matrix file" in md
    figs = {f["slug"]: f for f in json.loads((tmp_path / "figures.json").read_text())}
    for which in ("final", "best"):
        meta = figs[f"samples_{which}"]["meta"]
        assert meta["rows"][0] == "teacher (28 steps)" and meta["files"][0].endswith("teacher.npz")
        assert [(a, n) for a, n in zip(meta["row_arms"], meta["row_nfe"]) if a] == [(a, n) for a in ARMS for n in NFE]
        assert meta["missing"] == []
        # the files really hold the same prompts, which the grid's columns rely on
        labels = [np.load(f)["labels"] for f in meta["files"]]
        assert all(np.array_equal(lab, labels[0]) for lab in labels)
    assert {"grad_norm", "grad_terms", "loss_terms", "val_loss", "sample_metrics", "schedules"} <= set(figs)
    assert {"renoise/bias", "rl/weight"} <= set(figs["schedules"]["meta"]["keys"])
    assert {"grad_norm/twinflow", "grad_norm/rl"} <= set(figs["grad_terms"]["meta"]["keys"])
    assert figs["sample_metrics"]["meta"]["teacher_refs"] == 9
    assert html.stat().st_size > 50_000
