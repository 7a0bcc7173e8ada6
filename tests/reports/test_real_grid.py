"""A report of a real (tiny) grid: 2 arms x 2 seeds of 20-step digits runs, launched by the harness.

Arms: vanilla TwinFlow, and dynamic renoise + RL switched on at step 8 (so the per-term
gradient telemetry and the schedules are real too).

The auxiliaries and the teacher get a few dozen steps: the report's numbers only have to be
real and checkable, not good.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pandas as pd
from scipy.stats import t as t_dist

from reports.build import build_report
from reports.formatting import fmt_fold, fmt_num

from .checks import check_report, read_jsonl

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
claims:
  - claim: the RL switch raises the peak grad norm
    baseline: vanilla
    treatment: rl_hard
    metric: grad_norm/max
    reduce: max
    window: [9, null]
    direction: increase
    scale: log
  - claim: RL lifts the reward above the teacher's without costing fidelity
    tests:
      - {{baseline: teacher, treatment: rl_hard, metric: val/reward_nfe2, baseline_metric: teacher/reward,
          direction: increase}}
      - {{baseline: vanilla, treatment: rl_hard, metric: val/fd_nfe2, scale: log, direction: decrease,
          tolerance: 1.5}}
  - claim: RL lowers the validation loss in mid-run
    baseline: vanilla
    treatment: rl_hard
    metric: val/loss
    reduce: mean
    window: [5, 15]
    direction: decrease
    margin: 0.01
"""
# (claim, part) -> the test, as plain data for the independent check below
CLAIMS = [
    ("the RL switch raises the peak grad norm", 0,
     dict(base="vanilla", metric="grad_norm/max", base_metric="grad_norm/max", reduce="max", window=(9, None),
          direction=1, log=True, tol=None)),
    ("RL lifts the reward above the teacher's without costing fidelity", 0,
     dict(base="teacher", metric="val/reward_nfe2", base_metric="teacher/reward", reduce="final", window=None,
          direction=1, log=False, tol=None)),
    ("RL lifts the reward above the teacher's without costing fidelity", 1,
     dict(base="vanilla", metric="val/fd_nfe2", base_metric="val/fd_nfe2", reduce="final", window=None,
          direction=-1, log=True, tol=1.5)),
    ("RL lowers the validation loss in mid-run", 0,
     dict(base="vanilla", metric="val/loss", base_metric="val/loss", reduce="mean", window=(5, 15),
          direction=-1, log=False, tol=None)),
]


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
    html = build_report(grid_dir=real_grid, out_dir=tmp_path, progress=False)
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
    meta = figs["sample_metrics"]["meta"]
    # a teacher line on every panel: FD, reward, accuracy (and gold, proxy where the trainer writes them) per NFE
    assert {"fd", "reward", "accuracy"} <= set(meta["rows"]) and meta["teacher_refs"] == len(meta["rows"]) * len(NFE)
    assert meta["log_rows"] == ["fd"]
    assert html.stat().st_size > 50_000


def _reduced(run_dir: Path, key: str, reduce: str, window) -> float:
    """One run's number for a claim, from its metrics.jsonl and status.json (plain json, no reports code)."""
    recs = sorted((r for r in read_jsonl(run_dir / "metrics.jsonl") if key in r), key=lambda r: r["step"])
    if window is not None:
        recs = [r for r in recs if r["step"] >= window[0] and (window[1] is None or r["step"] <= window[1])]
    values = [float(r[key]) for r in recs]
    state = json.loads((run_dir / "status.json").read_text())["state"]
    if reduce == "final":
        return values[-1] if state == "done" or key.startswith("teacher/") else math.nan
    return max(values) if reduce == "max" else sum(values) / len(values)


def test_verdicts_of_a_real_grid_match_the_run_directories(real_grid, tmp_path):
    build_report(grid_dir=real_grid, out_dir=tmp_path, progress=False)
    got = pd.read_csv(tmp_path / "verdicts.csv")
    md = (tmp_path / "report.md").read_text()
    assert md.index("## Verdicts") < md.index("## Summary")
    # named relative to the grid directory (runs/tiny), never by the machine's absolute path
    assert "Claims from matrix file ../../tiny.yaml (grid manifest)." in md and str(real_grid.parent) not in md
    assert len(got) == len(CLAIMS)
    parts: dict[str, list[str]] = {}
    for claim, part, t in CLAIMS:
        row = got[(got["claim"] == claim) & (got["part"] == part)].iloc[0]
        diffs = []
        for seed in (0, 1):
            treat = _reduced(real_grid / "rl_hard" / f"seed-{seed}", t["metric"], t["reduce"], t["window"])
            base_dir = real_grid / ("rl_hard" if t["base"] == "teacher" else t["base"]) / f"seed-{seed}"
            base = _reduced(base_dir, t["base_metric"], t["reduce"], t["window"])
            diffs.append(math.log(treat / base) if t["log"] else treat - base)
        n = len(diffs)
        mean = sum(diffs) / n
        sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
        level = 0.05 / len(CLAIMS)  # Bonferroni over the matrix's four tests, one look with every seed
        half = t_dist.ppf(1 - level / 2, n - 1) * sd / math.sqrt(n)
        raw = t_dist.ppf(0.975, n - 1) * sd / math.sqrt(n)
        mde = (t_dist.ppf(1 - level / 2, n - 1) + t_dist.ppf(0.8, n - 1)) * sd / math.sqrt(n)
        lo, hi = mean - half, mean + half
        if t["tol"] is None:
            m = {"grad_norm/max": math.log(1.1), "val/reward_nfe2": 0.05, "val/loss": 0.01}[t["metric"]]
            want = ("no meaningful effect" if -m < lo and hi < m else
                    "supported" if t["direction"] * lo > 0 and t["direction"] * hi > 0 else
                    "contradicted" if t["direction"] * lo < 0 and t["direction"] * hi < 0 else "inconclusive")
        else:
            worse = sorted([-t["direction"] * lo, -t["direction"] * hi])
            margin = math.log(t["tol"]) if t["log"] else t["tol"]
            want = "supported" if worse[1] < margin else "contradicted" if worse[0] > margin else "inconclusive"
        assert row["n"] == n and row["seeds"] == "0,1"
        for key, value in (("mean", mean), ("sd", sd), ("lo", lo), ("hi", hi), ("mde", mde),
                           ("raw_lo", mean - raw), ("raw_hi", mean + raw)):
            assert row[key] == pytest.approx(value, rel=1e-9, abs=1e-12), (claim, part, key)
        assert row["verdict"] == want, (claim, part)
        parts.setdefault(claim, []).append(want)
        # the Markdown table prints the same numbers
        f = fmt_fold if t["log"] else (lambda v: fmt_num(v, signed=True))
        back = math.exp if t["log"] else (lambda v: v)
        effect = f"{f(back(mean))} [{f(back(lo))}, {f(back(hi))}]"
        unadjusted = f"[{f(back(mean - raw))}, {f(back(mean + raw))}]"
        assert f"| {effect} | {unadjusted} |" in md, (claim, part, effect)
    for claim, verdicts in parts.items():
        overall = ("contradicted" if "contradicted" in verdicts else
                   "no meaningful effect" if "no meaningful effect" in verdicts else
                   "supported" if all(v == "supported" for v in verdicts) else "inconclusive")
        assert (got.loc[got["claim"] == claim, "claim_verdict"] == overall).all()
        assert f"- {claim}: {overall.upper()}." in md


def test_run_table_and_divergence_summary_agree_on_a_real_grid(real_grid):
    """The report's per-run table and `grid collect --summary` state the same divergence numbers, and both
    match the largest grad norm and the spike total read straight from each run's metrics.jsonl."""
    from harness.collect import collect_grid, divergence_summary
    from reports.data import load_grid
    from reports.stats import run_table

    runs = run_table(load_grid(grid_dir=real_grid))
    summary = divergence_summary(collect_grid(real_grid)).set_index(["arm", "seed"])
    assert len(summary) == len(runs) == len(ARMS) * 2
    for (arm, seed), row in runs.iterrows():
        train = [r for r in read_jsonl(real_grid / arm / f"seed-{seed}" / "metrics.jsonl") if r["kind"] == "train"]
        norms = [r[k] for r in train for k in ("grad_norm/max", "grad_norm/total")
                 if isinstance(r.get(k), float) and math.isfinite(r[k])]
        assert row["max_grad_norm"] == summary.loc[(arm, seed), "max_grad_norm"] == max(norms)
        assert row["spikes"] == summary.loc[(arm, seed), "n_spikes"] == train[-1]["count/spikes"]
