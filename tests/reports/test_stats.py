import math

import numpy as np
import pandas as pd
import pytest

from reports.compute import Comparison
from reports.data import prepare
from reports.document import findings
from reports.formatting import fmt_num
from reports.stats import (
    arm_table,
    compare,
    diverge_steps,
    metric_specs,
    paired_interval,
    resolve_primary_nfe,
    run_table,
)
from reports.synthetic import synthetic_grid_frames


def test_paired_interval_is_the_verdicts_t_interval():
    from harness.inference import Paired, t_interval

    a, b = np.array([10.0, 11.0, 12.5, 9.0]), np.array([9.0, 10.5, 11.0, 9.5])
    est, lo, hi, p = paired_interval(a, b, mode="abs")
    assert est == pytest.approx(np.mean(a - b))
    assert (lo, hi) == pytest.approx(t_interval(Paired.of(a - b), 0.05))
    from scipy import stats as sps
    assert p == pytest.approx(sps.ttest_rel(a, b).pvalue)
    # rel: the geometric-mean ratio - 1 from paired log-ratios
    est, lo, hi, _ = paired_interval(a, b, mode="rel")
    assert est == pytest.approx(math.exp(np.mean(np.log(a / b))) - 1)
    assert lo < est < hi
    assert all(math.isnan(v) for v in paired_interval(np.array([3.0]), np.array([1.0]), mode="abs")[1:3])
    with pytest.raises(ValueError, match="mode"):
        paired_interval(np.ones(3), np.ones(3), mode="ratio")


def _table(values: dict[tuple[str, int], dict[str, float]]) -> pd.DataFrame:
    idx = pd.MultiIndex.from_tuples(list(values), names=["arm", "seed"])
    df = pd.DataFrame(list(values.values()), index=idx)
    df["state"] = "done"
    df["diverged"] = False
    df["diverge_step"] = np.nan
    return df


def test_compare_pairs_by_seed_and_skips_missing_values():
    runs = _table({("a", 0): {"fd_nfe2": 10.0}, ("a", 1): {"fd_nfe2": 11.0}, ("a", 2): {"fd_nfe2": np.nan},
                   ("b", 1): {"fd_nfe2": 8.0}, ("b", 2): {"fd_nfe2": 7.0}, ("b", 0): {"fd_nfe2": 9.0}})
    specs = [s for s in metric_specs([2], 2) if s.key == "fd_nfe2"]
    c = compare(runs, arm="b", ref="a", specs=specs).iloc[0]
    assert c["n_pairs"] == 2 and c["seeds"] == "0,1"  # seed 2 has no value in arm a
    assert c["estimate"] == pytest.approx(((9 - 10) + (8 - 11)) / 2)
    assert c["lo"] <= c["estimate"] <= c["hi"]


def test_findings_flag_an_unadjusted_interval_that_excludes_zero():
    vals = {(arm, s): {"fd_nfe2": (5.0 if arm == "b" else 10.0) + 0.1 * s * (1 if arm == "a" else 2),
                       "max_grad_norm": 2.0}
            for arm in ("a", "b") for s in range(4)}
    runs = _table(vals)
    specs = [s for s in metric_specs([2], 2) if s.key in ("fd_nfe2", "max_grad_norm")]
    summary = arm_table(runs, ["a", "b"], specs)
    (text,) = findings([Comparison("b", "a", compare(runs, arm="b", ref="a", specs=specs))], summary, primary_nfe=2)
    assert text.startswith("b vs a (4 paired seeds): ")
    assert "(better)" in text and "unadjusted 95% interval excludes 0 for FD@2" in text
    assert "max grad norm +0.0% [+0.0%, +0.0%]" in text  # identical values: shown, not flagged


def test_findings_with_a_single_seed_make_no_claim():
    runs = _table({("a", 0): {"fd_nfe2": 10.0}, ("b", 0): {"fd_nfe2": 5.0}})
    specs = [s for s in metric_specs([2], 2) if s.key == "fd_nfe2"]
    summary = arm_table(runs, ["a", "b"], specs)
    (text,) = findings([Comparison("b", "a", compare(runs, arm="b", ref="a", specs=specs))], summary, primary_nfe=2)
    assert "FD@2 -5.00 [n/a]" in text and "no interval (n/a)" in text


def test_run_table_matches_a_direct_computation(small_data):
    runs = run_table(small_data)
    m = small_data.metrics
    for (arm, seed), row in runs.iterrows():
        r = m[(m.arm == arm) & (m.seed == seed)]
        val = r[r.kind == "val"].sort_values("step")
        i = int(np.nanargmin(val["val/loss"].to_numpy()))
        assert row["best_val_loss"] == val["val/loss"].iloc[i]
        assert row["best_val_step"] == val["step"].iloc[i]
        assert row["max_grad_norm"] == pytest.approx(np.nanmax(r.loc[r.kind == "train", "grad_norm/max"]))
        if (arm, seed) == ("rl_hard", 2):
            assert row["state"] == "diverged" and row["diverge_step"] == 130
            assert math.isnan(row["final_val_loss"]) and math.isnan(row["fd_nfe2"])  # no final weights
        else:
            assert row["final_val_loss"] == val["val/loss"].iloc[-1]
            assert row["fd_nfe4"] == val["val/fd_nfe4"].iloc[-1]


def test_arm_table_counts_divergence_and_contributing_seeds(small_data):
    runs = run_table(small_data)
    specs = metric_specs(small_data.nfe, 2)
    t = arm_table(runs, small_data.arms, specs)
    assert t.loc["rl_hard", "diverged"] == 1 and t.loc["vanilla", "diverged"] == 0
    assert t.loc["rl_hard", "median_diverge_step"] == 130
    assert t.loc["rl_hard", "fd_nfe2:n"] == 2 and t.loc["rl_hard", "best_val_loss:n"] == 3
    fd = runs.loc["rl_hard", "fd_nfe2"]
    assert t.loc["rl_hard", "fd_nfe2"] == pytest.approx(fd.dropna().mean())


def test_nonfinite_values_are_left_out_not_zeroed():
    metrics, statuses = synthetic_grid_frames(arms=["a"], seeds=[0], steps=50, log_every=5, val_every=10)
    metrics.loc[metrics["kind"] == "train", "grad_norm/max"] = metrics.loc[metrics["kind"] == "train",
                                                                           "grad_norm/max"] + 1.0
    idx = metrics.index[metrics["kind"] == "train"][3]
    metrics.loc[idx, "grad_norm/max"] = np.inf
    data = prepare(name="x", metrics=metrics, statuses=statuses)
    row = run_table(data).iloc[0]
    assert math.isfinite(row["max_grad_norm"]) and row["max_grad_norm"] > 1.0
    assert row["grad_norm_nonfinite"] == 1


def test_diverge_step_comes_from_the_reason_when_named():
    reason = pd.Series(["non-finite loss or gradient at step 812", "3 non-finite steps in a row (last at step 40)",
                        None, "killed"])
    got = diverge_steps(reason, pd.Series([900, 41, 7, 8])).tolist()
    assert got == [812.0, 40.0, 7.0, 8.0]


def test_primary_nfe_resolution():
    assert resolve_primary_nfe((1, 2, 4), None) == 2
    assert resolve_primary_nfe((1, 4), None) == 1
    with pytest.raises(ValueError, match="primary_nfe=3"):
        resolve_primary_nfe((1, 2, 4), 3)


@pytest.mark.parametrize("x,kw,text", [(0.251476, {}, "0.251"), (1234.5, {}, "1234"), (-0.00666, {"signed": True},
                                       "-0.00666"), (2.0, {"signed": True}, "+2.00"), (float("nan"), {}, "—"),
                                       (float("inf"), {}, "+inf"), (3.2e-5, {}, "3.20e-05")])
def test_fmt_num(x, kw, text):
    assert fmt_num(x, **kw) == text
