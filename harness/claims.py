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
        window: [rl_onset, null]          # steps [start, end], inclusive; null end: to the last step; rl_onset:
                                          # the treatment's first step with a non-zero RL weight; vars allowed
        direction: decrease               # the effect the claim predicts for treatment vs baseline
        scale: log                        # log: paired log-ratios (fold changes); diff: paired differences
        margin: 1.1                       # smallest effect of interest (a fold on the log scale); default per metric
      - claim: RL lifts the gold reward above the teacher's without costing fidelity
        tests:                            # a claim of several parts: every part must hold
          - {baseline: teacher, treatment: spike_decay, metric: val/gold_nfe2, baseline_metric: teacher/gold,
             direction: increase}
          - {baseline: vanilla, treatment: spike_decay, metric: val/fd_nfe2, scale: log, direction: decrease,
             tolerance: 1.5}            # non-inferiority: FD@2 at most 1.5x the baseline's

The statistics and the verdict rule live in ``harness.inference`` (and ``harness.verdicts`` reads the
runs' values); this module only parses and validates, so a matrix with a wrong claim is refused before any
run starts. ``margin`` is the smallest effect of interest: inside it both ways, a test's verdict is "no
meaningful effect". Its default depends on the metric (``DEFAULT_MARGINS``); a metric without one needs
``margin`` in the claim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping

from twinflow_train.inputs import ConfigError, Where, checked, from_dict, raise_problems
from twinflow_train.rl.schedule import rl_onset
from twinflow_train.rundir import metric_keys

if TYPE_CHECKING:
    from twinflow_train.config import Config

TEACHER = "teacher"
"""Baseline name meaning the teacher's reference line (``kind: teacher`` record) of the treatment's own run."""

Reduce = Literal["final", "max", "min", "mean"]
Direction = Literal["increase", "decrease"]
Scale = Literal["diff", "log"]


DEFAULT_MARGINS: tuple[tuple[str, str, float], ...] = (
    # (key prefix, scale, margin): folds on the log scale, metric units on the diff scale
    ("grad_norm/", "log", 1.1),        # a 10% change of a peak grad norm is noise beside a spike (x1e3 and more)
    ("val/fd_", "log", 1.05),          # FD changes by ~2% between validations of a converged student
    ("teacher/fd", "log", 1.05),
    ("val/kid_", "diff", 0.002),       # KID can be <= 0 (unbiased): differences, not folds; docs/method.md 7.1
    ("teacher/kid", "diff", 0.002),
    ("val/gold_", "diff", 0.05),       # gold and proxy scores: z-score units of the real digits (SD ~0.8)
    ("val/proxy_", "diff", 0.05),
    ("teacher/gold", "diff", 0.05),
    ("teacher/proxy", "diff", 0.05),
    ("val/reward_", "diff", 0.05),     # the reward model's own units (digits: log-probability; proxy: gold z-units)
    ("teacher/reward", "diff", 0.05),
    ("val/accuracy_", "diff", 0.01),   # one percentage point of prompt accuracy
    ("val/loss", "log", 1.02),
)
"""Smallest effect of interest per metric kind, where the claim gives none (docs/harness.md, "Claims")."""


def default_margin(metric: str, scale: str) -> float | None:
    """The documented margin of ``metric`` on ``scale``, or None where there is none."""
    for prefix, sc, m in DEFAULT_MARGINS:
        if metric.startswith(prefix) and sc == scale:
            return m
    return None


def _window_problem(w: list[int | None]) -> str | None:
    ok = len(w) == 2 and w[0] is not None and w[0] >= 0 and (w[1] is None or w[1] >= w[0])
    return None if ok else (f"expected [start, end] steps, integers with 0 <= start <= end (end null: to the last "
                            f"step), got {w!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class ClaimTest:
    """One paired comparison: ``treatment`` against ``baseline`` on ``metric``, seed by seed."""

    baseline: str = checked(check=lambda v: None if v else "expected an arm name or 'teacher'",
                            missing="an arm, or 'teacher'")
    """An arm, or ``teacher`` (the teacher line of the treatment's run with the same seed)."""
    treatment: str = checked(check=lambda v: None if v else "expected an arm name", missing="an arm")
    metric: str = checked(check=lambda v: None if v else "expected a metrics.jsonl key", missing="a metrics.jsonl key")
    """metrics.jsonl key of the treatment's runs."""
    baseline_metric: str | None = checked(None, check=lambda v: None if v else "expected a metrics.jsonl key")
    """Key read from the baseline; None (as written): the metric itself."""
    reduce: Reduce = "final"
    """Per run: the value at the last record (``final``), or the max/min/mean over the window's records."""
    window: tuple[int | None, ...] | None = checked(None, check=_window_problem)
    """Steps [start, end] (inclusive; end None: to the last step) the reduction looks at; None: the whole run."""
    direction: Direction = checked(missing="increase or decrease: the effect the claim predicts, treatment vs "
                                           "baseline")
    """The effect the claim predicts (treatment vs baseline)."""
    scale: Scale = "diff"
    """``diff``: paired differences; ``log``: paired log-ratios, reported as fold changes (positive metrics)."""
    tolerance: float | None = checked(None, check=lambda v: None if v > 0 else f"expected a number > 0, got {v!r}")
    """Non-inferiority margin instead of a predicted effect: the treatment may be worse than the baseline by at
    most this much (``diff``: in the metric's units; ``log``: a fold, > 1)."""
    margin: float | None = checked(None, check=lambda v: None if v > 0 else f"expected a number > 0, got {v!r}")
    """Smallest effect of interest, both ways (``diff``: metric units; ``log``: a fold, > 1): an interval inside
    it reads "no meaningful effect". None: the metric's default (``DEFAULT_MARGINS``); the one-sided case is
    ``tolerance``."""

    def __post_init__(self) -> None:
        if self.baseline_metric is None:
            object.__setattr__(self, "baseline_metric", self.metric)
        if self.window is not None:
            object.__setattr__(self, "window", tuple(self.window))
        out: list[tuple[str | None, str]] = []
        if self.baseline == self.treatment:
            out.append((None, f"baseline and treatment are the same arm '{self.baseline}'"))
        if self.baseline == TEACHER and not self.baseline_metric.startswith("teacher/"):
            out.append(("baseline_metric", f"the teacher baseline needs a teacher key (e.g. teacher/gold for "
                                           f"val/gold_nfe2), got '{self.baseline_metric}'"))
        if self.baseline == TEACHER and (self.window is not None or self.reduce != "final"):
            out.append((None, "the teacher line is one record at step 0, so a teacher baseline takes reduce: final "
                              "and no window"))
        if self.scale == "log" and self.tolerance is not None and self.tolerance <= 1:
            out.append(("tolerance", f"on the log scale the margin is a fold (> 1, e.g. 1.5 = at most 1.5x worse), "
                                     f"got {self.tolerance!r}"))
        if self.tolerance is not None and self.margin is not None:
            out.append(("margin", "a non-inferiority test (tolerance) has its margin already; give one of the two"))
        if self.scale == "log" and self.margin is not None and self.margin <= 1:
            out.append(("margin", f"on the log scale the margin is a fold (> 1, e.g. 1.1 = within 10% either way), "
                                  f"got {self.margin!r}"))
        if self.tolerance is None and self.margin is None:
            # None stays where the metric has no default: ``arm_problems`` names it with the other problems
            object.__setattr__(self, "margin", default_margin(self.metric, self.scale))
        raise_problems(out)

    def bound(self) -> float | None:
        """The test's margin or tolerance on the analysis scale (``ln`` of a fold on the log scale); None for a
        test without either (read from a grid manifest written before margins: it cannot conclude "no meaningful
        effect")."""
        m = self.tolerance if self.tolerance is not None else self.margin
        if m is None:
            return None
        return math.log(m) if self.scale == "log" else float(m)

    def describe(self) -> str:
        """'val/fd_nfe2 (final)' or 'grad_norm/max (max over steps 134-400)'."""
        if self.window is None:
            where = "" if self.reduce == "final" else " over the run"
        else:
            start, end = self.window
            where = f" over steps {start}-{end if end is not None else 'end'}"
        what = self.metric if self.metric == self.baseline_metric else f"{self.metric} vs {self.baseline_metric}"
        return f"{what} ({self.reduce}{where})"

    def arm_problems(self, arms: Mapping[str, "Config"]) -> list[tuple[str | None, str]]:
        """What this test names that the matrix's arms do not have or do not write: ``(key or None, text)``."""
        out: list[tuple[str | None, str]] = []
        if self.tolerance is None and self.margin is None:
            out.append(("margin", f"no default smallest effect of interest for '{self.metric}' on the "
                                  f"{self.scale} scale (defaults: "
                                  + ", ".join(f"{p}* {sc} {m}" for p, sc, m in DEFAULT_MARGINS)
                                  + "); give margin: the smallest effect that matters"))
        arm_list = ", ".join(arms)
        if self.treatment not in arms:
            out.append(("treatment", f"no arm named '{self.treatment}'; arms: {arm_list}"))
        if self.baseline != TEACHER and self.baseline not in arms:
            out.append(("baseline", f"no arm named '{self.baseline}'; arms: {arm_list} "
                                    f"(or '{TEACHER}': the teacher line of the treatment's runs)"))
        if self.treatment in arms:
            valid = metric_keys(arms[self.treatment])
            if self.metric not in valid:
                out.append(("metric", f"arm '{self.treatment}' writes no '{self.metric}'; its runs write "
                                      f"{', '.join(sorted(valid))}"))
            if self.baseline == TEACHER and self.baseline_metric not in valid:
                teacher = sorted(k for k in valid if k.startswith("teacher/"))
                out.append(("baseline_metric", f"the runs of arm '{self.treatment}' have no teacher key "
                                                f"'{self.baseline_metric}'; teacher keys: {', '.join(teacher) or 'none'}"))
        if self.baseline in arms:
            valid = metric_keys(arms[self.baseline])
            if self.baseline_metric not in valid:
                key = "metric" if self.baseline_metric == self.metric else "baseline_metric"
                out.append((key, f"arm '{self.baseline}' writes no '{self.baseline_metric}'; its runs write "
                                 f"{', '.join(sorted(valid))}"))
        return out


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
        return cls(text=str(data["text"]), tests=tuple(from_dict(ClaimTest, t) for t in data["tests"]))


@dataclass(frozen=True, slots=True, kw_only=True)
class _ClaimEntry:
    """A claim of several parts as written: its sentence and its tests."""

    claim: str = checked(check=lambda v: None if v.strip() else "the claim's sentence is missing",
                         missing="the claim's sentence")
    tests: list[ClaimTest] = checked(check=lambda v: None if v else "expected a non-empty list of tests, got []",
                                     expect="a non-empty list of tests")


def parse_claims(raw: Any, *, file: str, arms: Mapping[str, "Config"], evaluate: Callable[[Any], Any],
                 problems: list[str]) -> tuple[Claim, ...]:
    """The matrix's ``claims:`` list; every problem is appended to ``problems`` naming the file and the key.

    ``arms``: arm name -> resolved config (the keys a claim may name depend on what each arm runs);
    ``evaluate``: the matrix's ``${expr}`` evaluation, for windows written in its vars.
    """
    claims = []
    for i, entry in enumerate(raw or ()):
        where = Where(file=file, parts=("claims",)).index(i)
        if not isinstance(entry, Mapping):
            problems.append(f"{where.section()}: expected a mapping with 'claim' and the test keys, got {entry!r}")
            continue
        entry = dict(entry)
        try:  # a window may be written in the matrix's vars, and open at the treatment arm's RL onset
            entry = _resolve_onsets(_evaluate_windows(entry, evaluate, where), arms, where)
            if "tests" in entry:
                parsed = from_dict(_ClaimEntry, entry, where)
                text, tests, places = parsed.claim, parsed.tests, [where.key("tests").index(j)
                                                                   for j in range(len(parsed.tests))]
            else:
                text = entry.pop("claim", None)
                if not isinstance(text, str) or not text.strip():  # reported with the test's own problems, at once
                    problems.append(f"{where.key('claim').field()}: the claim's sentence is missing (got {text!r})")
                    text = None
                tests, places = [from_dict(ClaimTest, entry, where)], [where]
        except ConfigError as e:
            problems.extend(e.problems)
            continue
        found = [f"{w.key(k).field()}: {t}" if k else w.own(t) for t, w in zip(tests, places)
                 for k, t in t.arm_problems(arms)]
        problems.extend(found)
        if not found and text is not None:
            claims.append(Claim(text=text.strip(), tests=tuple(tests)))
    return tuple(claims)


RL_ONSET = "rl_onset"
"""A window bound in the arm's own terms: the treatment arm's first step whose RL weight is not 0
(``twinflow_train.rl.schedule.rl_onset`` of its resolved config), so a change of its schedule moves the window."""


def _resolve_onsets(entry: dict[str, Any], arms: Mapping[str, "Config"], where: Where) -> dict[str, Any]:
    """``entry`` with each ``rl_onset`` bound of a window (its own, or each test's) replaced by the step it names;
    raises ``ConfigError`` naming the window where the treatment is no arm or its RL term never acts."""

    def one(body: Any, at: Where) -> Any:
        window = body.get("window") if isinstance(body, Mapping) else None
        if not isinstance(window, list) or RL_ONSET not in window:
            return body
        arm = body.get("treatment")
        if not isinstance(arm, str) or arm not in arms:
            raise ConfigError(f"{at.key('window').field()}: '{RL_ONSET}' is the treatment arm's RL onset, and the "
                              f"treatment {arm!r} is no arm; arms: {', '.join(arms)}")
        cfg = arms[arm]
        onset = rl_onset(cfg.rl, steps=cfg.run.steps)
        if onset > cfg.run.steps:
            why = "rl.enabled is false" if not cfg.rl.enabled else f"its RL weight is 0 at all {cfg.run.steps} steps"
            raise ConfigError(f"{at.key('window').field()}: '{RL_ONSET}': arm '{arm}' has no RL onset ({why})")
        return {**body, "window": [onset if v == RL_ONSET else v for v in window]}

    if isinstance(entry.get("tests"), list):
        tests_at = where.key("tests")
        return {**entry, "tests": [one(b, tests_at.index(j)) for j, b in enumerate(entry["tests"])]}
    return one(entry, where)


def _evaluate_windows(entry: dict[str, Any], evaluate: Callable[[Any], Any], where: Where) -> dict[str, Any]:
    """``entry`` with its ``window`` values (its own, or each test's) evaluated; raises ``ConfigError`` naming them."""

    def one(body: Any, at: Where) -> Any:
        if not isinstance(body, Mapping) or body.get("window") is None:
            return body
        try:
            return {**body, "window": evaluate(body["window"])}
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{at.key('window').field()}: {e}") from None

    if isinstance(entry.get("tests"), list):
        tests_at = where.key("tests")
        return {**entry, "tests": [one(b, tests_at.index(j)) for j, b in enumerate(entry["tests"])]}
    return one(entry, where)
