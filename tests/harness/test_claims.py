"""The ``claims:`` block of a matrix: parsed with the matrix, every problem named by file, entry and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.claims import TEACHER, ClaimTest
from harness.cli import main
from harness.matrix import load_matrix
from twinflow_train.rl.schedule import rl_onset

REPO = Path(__file__).resolve().parents[2]

ARMS = """\
base: base.yaml
seeds: [0, 1]
vars: {steps: 30}
overrides: {run.steps: "${steps}"}
arms:
  vanilla: {}
  rl_hard: {rl.enabled: true, rl.reward: digits, rl.warmup: "${steps // 3}"}
"""


def test_claims_parse_with_vars_parts_and_the_teacher_baseline(tiny_base, write, tmp_path):
    m = write("m.yaml", ARMS + """\
claims:
  - claim: the hard switch causes grad-norm spikes
    baseline: vanilla
    treatment: rl_hard
    metric: grad_norm/max
    reduce: max
    window: ["${steps // 3 + 1}", null]
    direction: increase
    scale: log
  - claim: RL lifts the reward above the teacher's without costing fidelity
    tests:
      - {baseline: teacher, treatment: rl_hard, metric: val/reward_nfe1, baseline_metric: teacher/reward,
         direction: increase}
      - {baseline: vanilla, treatment: rl_hard, metric: val/fd_nfe1, direction: decrease, scale: log,
         tolerance: 1.5}
""")
    grid = load_matrix(m, root=tmp_path / "runs")
    spikes, lift = grid.claims
    assert spikes.text == "the hard switch causes grad-norm spikes"
    assert spikes.tests == (ClaimTest(baseline="vanilla", treatment="rl_hard", metric="grad_norm/max",
                                      baseline_metric="grad_norm/max", reduce="max", window=(11, None),
                                      direction="increase", scale="log"),)
    assert spikes.tests[0].describe() == "grad_norm/max (max over steps 11-end)"
    part1, part2 = lift.tests
    assert (part1.baseline, part1.baseline_metric, part1.reduce, part1.scale) == (TEACHER, "teacher/reward",
                                                                                   "final", "diff")
    assert part2.tolerance == 1.5 and part2.window is None
    assert not (tmp_path / "runs").exists()


def test_a_window_opens_at_the_treatment_arms_rl_onset(tiny_base, write, tmp_path):
    """``rl_onset`` is read off the treatment's resolved schedule: the hard switch's warm-up, a cut ramp's start."""
    m = write("m.yaml", ARMS + """\
  rl_sigmoid: {extends: rl_hard, rl.schedule: sigmoid, rl.center: 15, rl.width: 2, rl.start: 7}
claims:
  - {claim: the hard switch spikes, baseline: vanilla, treatment: rl_hard, metric: grad_norm/max, reduce: max,
     window: [rl_onset, null], direction: increase, scale: log}
  - claim: the ramp does not
    tests:
      - {baseline: rl_hard, treatment: rl_sigmoid, metric: grad_norm/max, reduce: max, window: [rl_onset, 25],
         direction: decrease, scale: log}
""")
    hard, ramp = load_matrix(m, root=tmp_path / "runs").claims
    assert hard.tests[0].window == (10, None)  # rl.warmup = steps // 3: the first step with a non-zero weight
    assert ramp.tests[0].window == (7, 25)
    assert ramp.tests[0].describe() == "grad_norm/max (max over steps 7-25)"


BAD = {
    "unknown_treatment": ("""\
  - {claim: c, baseline: vanilla, treatment: rl_hardd, metric: val/fd_nfe1, direction: decrease}
""", ["claims[0], key 'treatment': no arm named 'rl_hardd'; arms: vanilla, rl_hard"]),
    "unknown_baseline": ("""\
  - {claim: c, baseline: vanila, treatment: rl_hard, metric: val/fd_nfe1, direction: decrease}
""", ["claims[0], key 'baseline': no arm named 'vanila'"]),
    "unknown_metric": ("""\
  - {claim: c, baseline: vanilla, treatment: rl_hard, metric: val/fd_nfe2, direction: decrease}
""", ["claims[0], key 'metric': arm 'rl_hard' writes no 'val/fd_nfe2'"]),
    # per-term gradients exist in RL runs only: the vanilla baseline has none to compare with
    "metric_missing_in_baseline": ("""\
  - {claim: c, baseline: vanilla, treatment: rl_hard, metric: grad_norm/rl, direction: decrease}
""", ["claims[0], key 'metric': arm 'vanilla' writes no 'grad_norm/rl'"]),
    "teacher_needs_teacher_key": ("""\
  - claim: c
    tests:
      - {baseline: teacher, treatment: rl_hard, metric: val/reward_nfe1, direction: increase}
""", ["claims[0], tests[0], key 'baseline_metric': the teacher baseline needs a teacher key"]),
    "bad_window": ("""\
  - {claim: c, baseline: vanilla, treatment: rl_hard, metric: grad_norm/max, reduce: max, window: [20, 5],
     direction: increase}
""", ["claims[0], key 'window': expected [start, end] steps"]),
    "window_var": ("""\
  - {claim: c, baseline: vanilla, treatment: rl_hard, metric: grad_norm/max, reduce: max,
     window: ["${stepz}", null], direction: increase}
""", ["claims[0], key 'window': unknown variable 'stepz'"]),
    "rl_onset_of_an_arm_without_rl": ("""\
  - {claim: c, baseline: rl_hard, treatment: vanilla, metric: grad_norm/max, reduce: max,
     window: [rl_onset, null], direction: increase}
""", ["claims[0], key 'window': 'rl_onset': arm 'vanilla' has no RL onset (rl.enabled is false)"]),
    "rl_onset_of_no_arm": ("""\
  - {claim: c, baseline: vanilla, treatment: rl_hardd, metric: grad_norm/max, reduce: max,
     window: [rl_onset, null], direction: increase}
""", ["claims[0], key 'window': 'rl_onset' is the treatment arm's RL onset, and the treatment 'rl_hardd' is no arm"]),
    "log_tolerance_is_a_fold": ("""\
  - {claim: c, baseline: vanilla, treatment: rl_hard, metric: val/fd_nfe1, direction: decrease, scale: log,
     tolerance: 0.5}
""", ["claims[0], key 'tolerance': on the log scale the margin is a fold"]),
    "unknown_key_and_values": ("""\
  - {claim: c, baseline: vanilla, treatment: rl_hard, metric: val/fd_nfe1, direction: down, reduce: last,
     scal: log}
""", ["claims[0]: unknown key 'scal'", "key 'direction': unknown value 'down'",
      "key 'reduce': unknown value 'last'"]),
    "no_claim_text": ("""\
  - {baseline: vanilla, treatment: rl_hard, metric: val/fd_nfe1, direction: decrease}
""", ["claims[0], key 'claim': the claim's sentence is missing"]),
    "second_entry": ("""\
  - {claim: ok, baseline: vanilla, treatment: rl_hard, metric: val/fd_nfe1, direction: decrease}
  - {claim: c, baseline: vanilla, treatment: rl_hard, metric: val/fid, direction: decrease}
""", ["claims[1], key 'metric': arm 'rl_hard' writes no 'val/fid'"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_claims_are_refused_naming_file_entry_and_key(case, tiny_base, write, tmp_path, capsys):
    body, needles = BAD[case]
    m = write(f"{case}.yaml", ARMS + "claims:\n" + body)
    root = tmp_path / "runs"
    rc = main(["grid", "run", str(m), "--root", str(root)])
    err = capsys.readouterr().err
    assert rc == 2, err
    for needle in needles:
        assert f"{m}: {needle}" in err or needle in err, f"{needle!r} not in:\n{err}"
    assert str(m) in err
    assert not root.exists(), "a refused matrix must create nothing"


def test_shipped_ladders_declare_claims_that_validate():
    digits = load_matrix(REPO / "ablations" / "blog-digits.yaml")
    texts = [c.text for c in digits.claims]
    # one claim per stabiliser at the searched weight and again at 3x, plus the two reward claims
    assert len(texts) == 11 and len(set(texts)) == len(texts)
    lift = digits.claims[-1]
    assert [t.metric for t in lift.tests] == ["val/gold_nfe2", "val/fd_nfe2"]
    assert lift.tests[0].baseline == TEACHER and lift.tests[0].baseline_metric == "teacher/gold"
    assert lift.tests[1].tolerance is not None
    qwen = load_matrix(REPO / "ablations" / "blog-qwen.yaml")
    assert qwen.claims and all(t.treatment in {a.name for a in qwen.arms} for c in qwen.claims for t in c.tests)
    # the spike windows open at their treatment's RL onset, named as such, never re-derived from the vars
    for path, grid in (("blog-digits.yaml", digits), ("blog-qwen.yaml", qwen)):
        configs = {r.arm: r.config for r in grid.runs}  # the RL schedule is the same for every seed
        spikes = [t for c in grid.claims for t in c.tests if "spikes" in c.text or "decay-on-spike" in c.text]
        assert len(spikes) >= 4
        for t in spikes:
            cfg = configs[t.treatment]
            assert t.window == (rl_onset(cfg.rl, steps=cfg.run.steps), None), (path, t)
        text = (REPO / "ablations" / path).read_text()
        assert text.count("window: [rl_onset, null]") == len(spikes), path
        assert 'window: ["${' not in text, path  # no window starts at a step computed from the vars


def test_kid_has_a_default_margin_on_the_difference_scale_only():
    # KID is unbiased and can be negative, so a fold (log scale) has no default: the claim must give one
    t = ClaimTest(baseline=TEACHER, treatment="vanilla", metric="val/kid_nfe1", baseline_metric="teacher/kid",
                  direction="decrease")
    assert t.margin == 0.002 and t.bound() == 0.002
    log = ClaimTest(baseline="a", treatment="b", metric="val/kid_nfe2", direction="increase", scale="log")
    assert log.margin is None
    assert ClaimTest(baseline="a", treatment="b", metric="teacher/kid_euler2", direction="increase").margin == 0.002


def test_every_problem_of_a_claim_is_reported_at_once(tiny_base, write, tmp_path, capsys):
    # the missing sentence used to hide the test's own problems until it was fixed and the matrix run again
    m = write("all_at_once.yaml", ARMS + "claims:\n"
              "  - {baseline: vanilla, metric: val/fd_nfe1, direction: decrease, scal: log}\n"
              "  - {claim: ok, baseline: vanilla, treatment: rl_hardd, metric: val/fd_nfe1, direction: decrease}\n")
    rc = main(["grid", "run", str(m), "--root", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert rc == 2, err
    for needle in ("claims[0], key 'claim': the claim's sentence is missing", "claims[0]: unknown key 'scal'",
                   "claims[0]: 'treatment' is missing", "claims[1], key 'treatment': no arm named 'rl_hardd'"):
        assert needle in err, f"{needle!r} not in:\n{err}"
    assert not (tmp_path / "runs").exists()
