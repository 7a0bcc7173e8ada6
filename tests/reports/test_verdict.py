"""The verdict section: paired t statistics, the verdict rule, per-run reductions, fold-change formatting."""

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
from reports.stats import fmt_diff, fmt_fold
from reports.verdict import claim_verdict, evaluate_test, paired_t, rule_verdict, run_values

# Student t quantiles from a printed table (not from scipy), df = 4
T975_DF4, T80_DF4 = 2.7764451, 0.9409646


def _test(**kw) -> ClaimTest:
    base = dict(baseline="a", treatment="b", metric="m", baseline_metric="m", direction="increase")
    return ClaimTest(**{**base, **kw})


def test_paired_t_interval_and_detectable_effect_by_hand():
    d = np.array([0.3, 0.1, 0.5, 0.2, 0.4])
    mean, sd, lo, hi, mde = paired_t(d)
    se = math.sqrt(sum((x - 0.3) ** 2 for x in d) / 4) / math.sqrt(5)
    assert mean == pytest.approx(0.3) and sd == pytest.approx(se * math.sqrt(5))
    assert (lo, hi) == (pytest.approx(0.3 - T975_DF4 * se), pytest.approx(0.3 + T975_DF4 * se))
    assert mde == pytest.approx((T975_DF4 + T80_DF4) * se)
    one = paired_t(np.array([0.7]))
    assert one[0] == 0.7 and all(math.isnan(v) for v in one[1:])


@pytest.mark.parametrize("lo, hi, direction, tolerance, scale, expected", [
    (0.1, 0.5, "increase", None, "diff", "supported"),
    (-0.5, -0.1, "increase", None, "diff", "contradicted"),
    (-0.1, 0.5, "increase", None, "diff", "inconclusive"),
    (-0.5, -0.1, "decrease", None, "diff", "supported"),
    # non-inferiority of a lower-better metric on the log scale, margin x1.5 (log 1.5 = 0.405)
    (-0.2, 0.3, "decrease", 1.5, "log", "supported"),
    (-0.2, 0.5, "decrease", 1.5, "log", "inconclusive"),
    (0.45, 0.9, "decrease", 1.5, "log", "contradicted"),
    # a higher-better metric, margin 0.1 in its units: worse means lower
    (-0.05, 0.2, "increase", 0.1, "diff", "supported"),
    (-0.3, -0.15, "increase", 0.1, "diff", "contradicted"),
])
def test_verdict_rule(lo, hi, direction, tolerance, scale, expected):
    t = _test(direction=direction, tolerance=tolerance, scale=scale)
    assert rule_verdict(t, n=5, lo=lo, hi=hi) == expected
    assert rule_verdict(t, n=1, lo=lo, hi=hi) == "inconclusive"  # no interval from one pair


def test_claim_verdict_needs_every_part():
    assert claim_verdict(["supported", "supported"]) == "supported"
    assert claim_verdict(["supported", "inconclusive"]) == "inconclusive"
    assert claim_verdict(["inconclusive", "contradicted"]) == "contradicted"


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
    v, miss = run_values(data, arm="b", key="grad_norm/max", reduce="max", window=(4, None), scale="log")
    assert v == {0: 2.0 * 5 * 10, 1: 2.0 * 6 * 10, 2: 2.0 * 7 * 10} and miss == {}  # a diverged run has a max
    v, miss = run_values(data, arm="b", key="grad_norm/max", reduce="mean", window=(1, 2), scale="diff")
    assert v[1] == pytest.approx(2.0 * (2 + 3) / 2)
    v, miss = run_values(data, arm="b", key="val/fd_nfe2", reduce="final", window=None, scale="log")
    assert v == {0: 2.0 * 16, 1: 2.0 * 17} and miss == {2: "b seed 2: no final value (run diverged)"}
    # the last value of a window that closes before the end exists for a run that diverged later
    v, miss = run_values(data, arm="b", key="val/fd_nfe2", reduce="final", window=(0, 4), scale="log")
    assert v == {0: 2.0 * 13, 1: 2.0 * 14, 2: 2.0 * 15} and miss == {}
    v, miss = run_values(data, arm="a", key="grad_norm/max", reduce="max", window=(7, 9), scale="diff")
    assert v == {} and miss[0] == "a seed 0: no grad_norm/max record in steps 7-9"


def test_paired_effects_against_an_arm_and_against_the_teacher():
    data = _grid()
    spikes = Claim("spikes", (_test(metric="grad_norm/max", baseline_metric="grad_norm/max", reduce="max",
                                    window=(4, None), scale="log"),))
    r = evaluate_test(data, spikes, 0)
    # per seed: max b = 2 * 10 * (5 + s), max a = 6 + s: log-ratios differ by seed
    d = [math.log(20 * (5 + s) / (6 + s)) for s in (0, 1, 2)]
    assert r.n == 3 and r.seeds == (0, 1, 2) and r.mean == pytest.approx(np.mean(d))
    assert r.effect == pytest.approx(math.exp(np.mean(d))) and r.verdict == "supported"
    lift = Claim("lift", (_test(baseline="teacher", treatment="b", metric="val/gold_nfe2",
                                baseline_metric="teacher/gold"),))
    r = evaluate_test(data, lift, 0)
    # seed 2 of b diverged: no final gold, so no pair; the others: 0.2 - 0.15, 0.4 - 0.15
    assert r.n == 2 and r.mean == pytest.approx(((0.2 - 0.15) + (0.4 - 0.15)) / 2)
    assert r.excluded == ("b seed 2: no final value (run diverged)",)
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
    assert r.n == 3 and r.sd == 0 and r.verdict == "inconclusive"
    assert r.effect_text() == "none: equal values on every seed"
    assert r.mde_text() == "any (the paired differences do not vary)"
    shifted = evaluate_test(_grid(), Claim("x", (_test(metric="val/gold_nfe2", baseline_metric="val/gold_nfe2"),)), 0)
    assert shifted.sd > 0 and shifted.effect_text().startswith("+")  # varying differences keep the interval


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
    write_report(data, out_dir=tmp_path, claims=claims, claims_source="the test", n_boot=200, progress=False)
    md = (tmp_path / "report.md").read_text()
    html = (tmp_path / "report.html").read_text()
    assert md.index("## Verdicts") < md.index("## Summary")
    assert html.index('id="verdicts"') < html.index('id="summary"')
    # FD@2 of b is twice a's on every paired seed: x2.0 is beyond the x1.5 margin whatever the spread
    assert "- spikes: SUPPORTED." in md and "- lift without cost: CONTRADICTED." in md
    csv = pd.read_csv(tmp_path / "verdicts.csv")
    fd = csv[(csv["claim"] == "lift without cost") & (csv["part"] == 1)].iloc[0]
    assert fd["effect"] == pytest.approx(2.0) and fd["verdict"] == "contradicted" and fd["n"] == 2
    assert "| spikes | supported | b vs a | grad_norm/max (max over steps 4-end) | increase |" in md
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
    assert main(["report", str(disk_grid), "--out", str(out), "--claims", str(good), "--no-progress", "--bootstrap",
                 "200"]) == 0
    md = (out / "report.md").read_text()
    assert f"Claims from matrix file {good}." in md and "- RL spikes: " in md
    assert pd.read_csv(out / "verdicts.csv").loc[0, "n"] == 3  # the synthetic grid's 3 seeds, all with a max
