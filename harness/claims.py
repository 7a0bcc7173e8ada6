"""The ``claims:`` block of a matrix file: which arm pair tests which claim, on which metric.

A claim is a sentence of the experiment's hypothesis ("a sigmoid ramp prevents the
grad-norm spikes") with one or more tests; a test compares a treatment arm with a
baseline arm (or with the teacher's reference line) on one metrics.jsonl key, reduced
per run to one number::

    claims:
      - claim: a sigmoid ramp prevents the grad-norm spikes
        baseline: rl_hard
        treatment: rl_sigmoid
        metric: grad_norm/max
        reduce: max                       # final | max | min | mean over the window
        window: ["${steps // 3 + 1}", null]   # steps [start, end], inclusive; null end: to the last step
        direction: decrease               # the effect the claim predicts for treatment vs baseline
        scale: log                        # log: paired log-ratios (fold changes); diff: paired differences
      - claim: RL lifts the gold reward above the teacher's without costing fidelity
        tests:                            # a claim of several parts: every part must hold
          - {baseline: teacher, treatment: spike_decay, metric: val/gold_nfe2, baseline_metric: teacher/gold,
             direction: increase}
          - {baseline: vanilla, treatment: spike_decay, metric: val/fd_nfe2, scale: log, direction: decrease,
             tolerance: 1.5}            # non-inferiority: FD@2 at most 1.5x the baseline's

The statistics and the verdict rule live in ``reports.verdict``; this module only
parses and validates, so a matrix with a wrong claim is refused before any run starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping

from twinflow_train.rundir import metric_keys

if TYPE_CHECKING:
    from twinflow_train.config import Config

TEACHER = "teacher"
"""Baseline name meaning the teacher's reference line (``kind: teacher`` record) of the treatment's own run."""
CLAIM_KEYS = ("claim", "tests")
TEST_KEYS = ("baseline", "treatment", "metric", "baseline_metric", "reduce", "window", "direction", "scale",
             "tolerance")
REDUCES = ("final", "max", "min", "mean")
DIRECTIONS = ("increase", "decrease")
SCALES = ("diff", "log")

Reduce = Literal["final", "max", "min", "mean"]
Direction = Literal["increase", "decrease"]
Scale = Literal["diff", "log"]


@dataclass(frozen=True, slots=True)
class ClaimTest:
    """One paired comparison: ``treatment`` against ``baseline`` on ``metric``, seed by seed."""

    baseline: str
    """An arm, or ``teacher`` (the teacher line of the treatment's run with the same seed)."""
    treatment: str
    metric: str
    """metrics.jsonl key of the treatment's runs."""
    baseline_metric: str
    """Key read from the baseline (the metric itself unless the baseline is the teacher)."""
    reduce: Reduce = "final"
    """Per run: the value at the last record (``final``), or the max/min/mean over the window's records."""
    window: tuple[int, int | None] | None = None
    """Steps [start, end] (inclusive; end None: to the last step) the reduction looks at; None: the whole run."""
    direction: Direction = "increase"
    """The effect the claim predicts (treatment vs baseline)."""
    scale: Scale = "diff"
    """``diff``: paired differences; ``log``: paired log-ratios, reported as fold changes (positive metrics)."""
    tolerance: float | None = None
    """Non-inferiority margin instead of a predicted effect: the treatment may be worse than the baseline by at
    most this much (``diff``: in the metric's units; ``log``: a fold, > 1)."""

    def describe(self) -> str:
        """'val/fd_nfe2 (final)' or 'grad_norm/max (max over steps 134-400)'."""
        if self.window is None:
            where = "" if self.reduce == "final" else " over the run"
        else:
            start, end = self.window
            where = f" over steps {start}-{end if end is not None else 'end'}"
        what = self.metric if self.metric == self.baseline_metric else f"{self.metric} vs {self.baseline_metric}"
        return f"{what} ({self.reduce}{where})"


@dataclass(frozen=True, slots=True)
class Claim:
    text: str
    tests: tuple[ClaimTest, ...]

    def to_json(self) -> dict[str, Any]:
        """As the grid manifest stores it (``from_json`` reads it back)."""
        return {"text": self.text, "tests": [{k: getattr(t, k) for k in ClaimTest.__dataclass_fields__}
                                             for t in self.tests]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Claim":
        tests = []
        for t in data["tests"]:
            t = dict(t)
            window = t.get("window")
            t["window"] = None if window is None else (int(window[0]), None if window[1] is None else int(window[1]))
            tests.append(ClaimTest(**t))
        return cls(text=str(data["text"]), tests=tuple(tests))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _positive_number(v: Any) -> bool:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(float(v)) and v > 0
    except OverflowError:  # an integer beyond float range
        return False


def _parse_test(raw: Mapping[str, Any], *, where: str, arms: Mapping[str, "Config"],
                evaluate: Callable[[Any], Any], problems: list[str]) -> ClaimTest | None:
    n0 = len(problems)
    for k in raw:
        if k not in TEST_KEYS:
            problems.append(f"{where}: unknown key '{k}'; valid keys: {', '.join(TEST_KEYS)}")
    absent = [k for k in ("baseline", "treatment", "metric") if not isinstance(raw.get(k), str) or not raw.get(k)]
    for k in absent:
        problems.append(f"{where}, key '{k}': missing or not a string (got {raw.get(k)!r})")
    if absent:
        return None
    baseline, treatment, metric = raw["baseline"], raw["treatment"], raw["metric"]
    arm_list = ", ".join(arms)
    if treatment not in arms:
        problems.append(f"{where}, key 'treatment': no arm named '{treatment}'; arms: {arm_list}")
    if baseline != TEACHER and baseline not in arms:
        problems.append(f"{where}, key 'baseline': no arm named '{baseline}'; arms: {arm_list} "
                        f"(or '{TEACHER}': the teacher line of the treatment's runs)")
    if baseline == treatment:
        problems.append(f"{where}: baseline and treatment are the same arm '{baseline}'")
    baseline_metric = raw.get("baseline_metric", metric)
    if not isinstance(baseline_metric, str) or not baseline_metric:
        problems.append(f"{where}, key 'baseline_metric': expected a metrics.jsonl key, got {baseline_metric!r}")
        baseline_metric = metric
    if baseline == TEACHER and not baseline_metric.startswith("teacher/"):
        problems.append(f"{where}, key 'baseline_metric': the teacher baseline needs a teacher key "
                        f"(e.g. teacher/gold for val/gold_nfe2), got '{baseline_metric}'")
    if treatment in arms:
        valid = metric_keys(arms[treatment])
        if metric not in valid:
            problems.append(f"{where}, key 'metric': arm '{treatment}' writes no '{metric}'; its runs write "
                            f"{', '.join(sorted(valid))}")
        if baseline == TEACHER and baseline_metric.startswith("teacher/") and baseline_metric not in valid:
            problems.append(f"{where}, key 'baseline_metric': the runs of arm '{treatment}' have no teacher key "
                            f"'{baseline_metric}'; teacher keys: "
                            f"{', '.join(sorted(k for k in valid if k.startswith('teacher/'))) or 'none'}")
    if baseline in arms:
        valid = metric_keys(arms[baseline])
        if baseline_metric not in valid:
            key = "baseline_metric" if "baseline_metric" in raw else "metric"
            problems.append(f"{where}, key '{key}': arm '{baseline}' writes no '{baseline_metric}'; its runs "
                            f"write {', '.join(sorted(valid))}")

    reduce = raw.get("reduce", "final")
    if reduce not in REDUCES:
        problems.append(f"{where}, key 'reduce': unknown value {reduce!r}; valid: {', '.join(REDUCES)}")
    direction = raw.get("direction")
    if direction not in DIRECTIONS:
        what = "missing" if direction is None else f"unknown value {direction!r}"
        problems.append(f"{where}, key 'direction': {what}; valid: {', '.join(DIRECTIONS)} "
                        f"(the effect the claim predicts, treatment vs baseline)")
    scale = raw.get("scale", "diff")
    if scale not in SCALES:
        problems.append(f"{where}, key 'scale': unknown value {scale!r}; valid: {', '.join(SCALES)}")

    window = None
    if raw.get("window") is not None:
        try:
            w = evaluate(raw["window"])
        except (ValueError, TypeError) as e:
            problems.append(f"{where}, key 'window': {e}")
            w = None
        if w is not None:
            ok = (isinstance(w, list) and len(w) == 2 and _is_int(w[0]) and w[0] >= 0
                  and (w[1] is None or (_is_int(w[1]) and w[1] >= w[0])))
            if ok:
                window = (int(w[0]), None if w[1] is None else int(w[1]))
            else:
                problems.append(f"{where}, key 'window': expected [start, end] steps, integers with "
                                f"0 <= start <= end (end null: to the last step), got {w!r}")
    if baseline == TEACHER and (window is not None or reduce != "final"):
        problems.append(f"{where}: the teacher line is one record at step 0, so a teacher baseline takes "
                        f"reduce: final and no window")

    tolerance = raw.get("tolerance")
    if tolerance is not None:
        if not _positive_number(tolerance):
            problems.append(f"{where}, key 'tolerance': expected a number > 0, got {tolerance!r}")
        elif scale == "log" and tolerance <= 1:
            problems.append(f"{where}, key 'tolerance': on the log scale the margin is a fold (> 1, e.g. 1.5 = "
                            f"at most 1.5x worse), got {tolerance!r}")
        else:
            tolerance = float(tolerance)
    if len(problems) > n0:
        return None
    return ClaimTest(baseline=baseline, treatment=treatment, metric=metric, baseline_metric=baseline_metric,
                     reduce=reduce, window=window, direction=direction, scale=scale, tolerance=tolerance)


def parse_claims(raw: Any, *, file: str, arms: Mapping[str, "Config"], evaluate: Callable[[Any], Any],
                 problems: list[str]) -> tuple[Claim, ...]:
    """The matrix's ``claims:`` list; every problem is appended to ``problems`` naming the file and the key.

    ``arms``: arm name -> resolved config (the keys a claim may name depend on what each arm runs);
    ``evaluate``: the matrix's ``${expr}`` evaluation, for windows written in its vars.
    """
    if raw is None:
        return ()
    if not isinstance(raw, list):
        problems.append(f"{file}: claims must be a list of {{claim: TEXT, baseline, treatment, metric, direction, "
                        f"...}} entries (got {raw!r})")
        return ()
    claims = []
    for i, entry in enumerate(raw):
        where = f"{file}: claims[{i}]"
        if not isinstance(entry, Mapping):
            problems.append(f"{where}: expected a mapping with 'claim' and the test keys, got {entry!r}")
            continue
        text = entry.get("claim")
        if not isinstance(text, str) or not text.strip():
            problems.append(f"{where}, key 'claim': the claim's sentence is missing (got {text!r})")
            continue
        if "tests" in entry:
            extra = [k for k in entry if k not in CLAIM_KEYS]
            if extra:
                problems.append(f"{where}: with 'tests', the test keys go inside each test (found "
                                f"{', '.join(map(str, extra))} beside it)")
            bodies = entry["tests"]
            if not isinstance(bodies, list) or not bodies:
                problems.append(f"{where}, key 'tests': expected a non-empty list of tests, got {bodies!r}")
                continue
            pairs = [(f"{where}, tests[{j}]", b) for j, b in enumerate(bodies)]
        else:
            pairs = [(where, {k: v for k, v in entry.items() if k != "claim"})]
        tests = []
        for w, body in pairs:
            if not isinstance(body, Mapping):
                problems.append(f"{w}: expected a mapping of test keys ({', '.join(TEST_KEYS)}), got {body!r}")
                continue
            t = _parse_test(body, where=w, arms=arms, evaluate=evaluate, problems=problems)
            if t is not None:
                tests.append(t)
        if len(tests) == len(pairs):
            claims.append(Claim(text=text.strip(), tests=tuple(tests)))
    return tuple(claims)
