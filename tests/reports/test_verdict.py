"""The verdict section: per-run reductions, paired effects on the verdicts' engine, the report's first screen,
fold-change formatting."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness.claims import Claim, ClaimTest
from reports.build import write_report
from reports.data import prepare
from reports.formatting import fmt_diff, fmt_fold
from harness.verdicts import judge_fixed, run_values
from reports.verdict import effect_text, mde_text

def _test(**kw) -> ClaimTest:
    base = dict(baseline="a", treatment="b", metric="m", baseline_metric="m", direction="increase")
    if "tolerance" not in kw and "margin" not in kw:
        kw["margin"] = 1.1 if kw.get("scale") == "log" else 0.01
    return ClaimTest(**{**base, **kw})


def evaluate_test(data, claim, part):
    return [r for r in judge_fixed([claim], data.metrics, data.statuses).results if r.part == part][0]


def _grid():
    """Two arms x 3 seeds, hand-made: train records at steps 1..6, validation at 3 and 6, a teacher line."""
    rows, statuses = [], []
    for arm, scale in (("a", 1.0), ("b", 2.0)):
        for seed in (0, 1, 2):
            state = "diverged" if (arm, seed) == ("b", 2) else "done"
            statuses.append({"arm": arm, "seed": seed, "state": state, "reason": None, "step": 6, "wall_s": 1.0,
                             "run_dir": None})
            for step in range(1, 7):
                rows.append({"arm": arm, "seed": seed, "kind": "train", "step": step,
                             "grad_norm/max": scale * (step + seed) * (10.0 if step == 5 and arm == "b" else 1.0)})
            for step in (3, 6):
                rows.append({"arm": arm, "seed": seed, "kind": "val", "step": step, "val/loss": 1.0,
                             "val/fd_nfe2": scale * (10 + seed + step), "val/gold_nfe2": scale * 0.1 * (seed + 1)})
            rows.append({"arm": arm, "seed": seed, "kind": "teacher", "step": 0, "teacher/gold": 0.15})
    m = pd.DataFrame(rows).assign(grid="g", run_dir=None)
    return prepare(name="g", metrics=m, statuses=pd.DataFrame(statuses))


def test_run_values_reduce_windows_and_leave_out_runs_with_a_reason():
    data = _grid()
    v, miss = run_values(data.metrics, data.statuses, arm="b", key="grad_norm/max", reduce="max", window=(4, None), scale="log")
    assert v == {0: 2.0 * 5 * 10, 1: 2.0 * 6 * 10, 2: 2.0 * 7 * 10} and miss == {}  # a diverged run has a max
    v, miss = run_values(data.metrics, data.statuses, arm="b", key="grad_norm/max", reduce="mean", window=(1, 2), scale="diff")
    assert v[1] == pytest.approx(2.0 * (2 + 3) / 2)
    v, miss = run_values(data.metrics, data.statuses, arm="b", key="val/fd_nfe2", reduce="final", window=None, scale="log")
    # a diverged run has no final weights: the worst outcome (inf), signed by the test that reads it
    assert v == {0: 2.0 * 16, 1: 2.0 * 17, 2: math.inf} and miss == {}
    # the last value of a window that closes before the end exists for a run that diverged later
    v, miss = run_values(data.metrics, data.statuses, arm="b", key="val/fd_nfe2", reduce="final", window=(0, 4), scale="log")
    assert v == {0: 2.0 * 13, 1: 2.0 * 14, 2: 2.0 * 15} and miss == {}
    v, miss = run_values(data.metrics, data.statuses, arm="a", key="grad_norm/max", reduce="max", window=(7, 9), scale="diff")
    assert v == {} and miss[0] == "a seed 0: no grad_norm/max record in steps 7-9"


def test_paired_effects_against_an_arm_and_against_the_teacher():
    data = _grid()
    spikes = Claim("spikes", (_test(metric="grad_norm/max", baseline_metric="grad_norm/max", reduce="max",
                                    window=(4, None), scale="log"),))
    r = evaluate_test(data, spikes, 0)
    # per seed: max b = 2 * 10 * (5 + s), max a = 6 + s: log-ratios differ by seed
    d = [math.log(20 * (5 + s) / (6 + s)) for s in (0, 1, 2)]
    assert r.n == 3 and r.seeds == (0, 1, 2) and r.paired.mean == pytest.approx(np.mean(d))
    assert r.effect == pytest.approx(math.exp(np.mean(d))) and r.verdict == "supported"
    lift = Claim("lift", (_test(baseline="teacher", treatment="b", metric="val/gold_nfe2",
                                baseline_metric="teacher/gold"),))
    r = evaluate_test(data, lift, 0)
    # seed 2 of b diverged: its final gold is the worst outcome, an infinitely worse pair; the others:
    # 0.2 - 0.15, 0.4 - 0.15, whose interval stays the lower end
    assert r.n == 3 and r.paired.mean == pytest.approx(((0.2 - 0.15) + (0.4 - 0.15)) / 2)
    assert r.paired.neg_inf == 1 and r.lo == -math.inf and r.verdict == "inconclusive"
    # a key no run logged (a grid older than the metric): said once, and no verdict can be reached
    gold = Claim("gold", (_test(baseline="teacher", treatment="b", metric="val/gold_nfe4",
                                baseline_metric="teacher/gold"),))
    r = evaluate_test(data, gold, 0)
    assert r.n == 0 and r.verdict == "inconclusive" and r.excluded == ("no run of this grid logged val/gold_nfe4",)


def test_equal_runs_read_as_no_effect_not_as_a_tiny_interval():
    """Two arms whose runs give the same value on every seed (a clip that never binds): the effect is named as
    none, and no detectable size is claimed from a spread of zero."""
    data = _grid()
    same = Claim("same", (_test(baseline="a", treatment="a2", metric="grad_norm/max", baseline_metric="grad_norm/max",
                                reduce="max", scale="log"),))
    m = data.metrics
    twin = m[m["arm"] == "a"].assign(arm="a2")
    st = data.statuses
    data = prepare(name="g", metrics=pd.concat([m, twin]),
                   statuses=pd.concat([st, st[st["arm"] == "a"].assign(arm="a2")]))
    r = evaluate_test(data, same, 0)
    # equal on every seed: inside any margin, so no meaningful effect (the finding, not "inconclusive")
    assert r.n == 3 and r.paired.sd == 0 and r.verdict == "no meaningful effect"
    assert effect_text(r, r.lo, r.hi) == "none: equal values on every seed"
    assert mde_text(r) == "any (the paired differences do not vary)"
    shifted = evaluate_test(_grid(), Claim("x", (_test(metric="val/gold_nfe2", baseline_metric="val/gold_nfe2",
                                                       reduce="max"),)), 0)
    assert shifted.paired.sd > 0 and effect_text(shifted, shifted.lo, shifted.hi).startswith("+")


def test_fold_changes_beyond_ten_times():
    assert [fmt_fold(x) for x in (3.4e14, 3449.0, 21.0, 9.96, 3.4, 1.02, 0.052, 1.2e-5)] == \
        ["x3.4e14", "x3400", "x21", "x9.96", "x3.4", "x1.02", "x0.052", "x1.2e-5"]
    # within 1% of no change the change itself keeps two significant digits: x1.00045 is not x1
    assert [fmt_fold(x) for x in (1.000453, 0.99994, 0.9962, 1.0, 1 - 2.4e-8)] == \
        ["x1.00045", "x0.999940", "x0.9962", "x1", "x1.000000"]
    rel = {"mode": "rel"}
    # a ratio of 3.4e14 is a fold change, never "+34000000000000000%"; the interval follows the estimate
    assert fmt_diff({**rel, "estimate": 3.4e14 - 1, "lo": 11.0, "hi": 8.1e15}) == "x3.4e14 [x12, x8.1e15]"
    assert fmt_diff({**rel, "estimate": 0.3, "lo": 0.1, "hi": 0.5}) == "+30% [+10%, +50%]"
    assert fmt_diff({**rel, "estimate": -0.95, "lo": -0.99, "hi": -0.5}) == "x0.05 [x0.01, x0.5]"


def test_verdict_section_opens_both_reports(tmp_path):
    data = _grid()
    claims = [Claim("spikes", (_test(metric="grad_norm/max", baseline_metric="grad_norm/max", reduce="max",
                                     window=(4, None), scale="log"),)),
              Claim("lift without cost", (
                  _test(baseline="teacher", treatment="b", metric="val/gold_nfe2", baseline_metric="teacher/gold"),
                  _test(baseline="a", treatment="b", metric="val/fd_nfe2", baseline_metric="val/fd_nfe2",
                        direction="decrease", scale="log", tolerance=1.5)))]
    write_report(data, out_dir=tmp_path, claims=claims, claims_source="the test", progress=False)
    md = (tmp_path / "report.md").read_text()
    html = (tmp_path / "report.html").read_text()
    assert md.index("## Verdicts") < md.index("## Summary")
    assert html.index('id="verdicts"') < html.index('id="summary"')
    # FD@2 of b is twice a's on every paired seed: x2.0 is beyond the x1.5 margin whatever the spread
    assert "- spikes: SUPPORTED." in md and "- lift without cost: CONTRADICTED." in md
    csv = pd.read_csv(tmp_path / "verdicts.csv")
    fd = csv[(csv["claim"] == "lift without cost") & (csv["part"] == 1)].iloc[0]
    # seed 2 of b diverged: the worst outcome, so the fold is unbounded and the claim's bound is passed for sure
    assert fd["effect"] == math.inf and fd["verdict"] == "contradicted" and fd["n"] == 3
    assert "| spikes | supported | b vs a: grad_norm/max (max over steps 4-end) |" in md
    assert md.index("| spikes | supported |") < md.index("Claims from the test.")  # the table comes first
    figs = {f["slug"]: f for f in json.loads((tmp_path / "figures.json").read_text())}
    assert figs["verdicts"]["meta"]["tests"] == [["spikes", 0, "supported"], ["lift without cost", 0, "inconclusive"],
                                                 ["lift without cost", 1, "contradicted"]]
    assert md.index("![Claims: paired effects]") < md.index("## Summary")


def test_claims_from_another_matrix_file_on_the_command_line(disk_grid, tmp_path, capsys):
    from twinflow_lab.cli import main

    repo = Path(__file__).resolve().parents[2]
    text = (f"base: {repo / 'configs' / 'digits.yaml'}\nseeds: [0]\narms:\n  vanilla: {{}}\n"
            "  rl_hard: {rl.enabled: true, rl.reward: digits}\nclaims:\n"
            "  - {claim: RL spikes, baseline: vanilla, treatment: rl_hard, metric: grad_norm/max, reduce: max,"
            " window: [100, null], direction: increase, scale: log}\n")
    good = tmp_path / "good.yaml"
    good.write_text(text)
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("treatment: rl_hard", "treatment: rl_hardd"))
    out = tmp_path / "bad-report"
    assert main(["report", str(disk_grid), "--out", str(out), "--claims", str(bad), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: claims[0], key 'treatment': no arm named 'rl_hardd'" in err and not out.exists()
    out = tmp_path / "report"
    assert main(["report", str(disk_grid), "--out", str(out), "--claims", str(good), "--no-progress", ]) == 0
    md = (out / "report.md").read_text()
    assert f"Claims from matrix file {good}." in md and "- RL spikes: " in md
    assert pd.read_csv(out / "verdicts.csv").loc[0, "n"] == 3  # the synthetic grid's 3 seeds, all with a max
