"""The claims of a matrix judged on its runs: per-run values, paired differences, looks and verdicts.

One code path serves the sequential grid (``harness.sequential`` decides after each wave which arms get
more seeds) and the report (``reports.verdict`` shows the same numbers): the statistics are
``harness.inference``'s.

Per run, a test's metric is reduced to one number (its final value, or its max/min/mean over a step
window); runs are paired by seed. A run that diverged has no final weights: on a final-value test it is
the worst outcome (its pair's difference is infinite in the direction the claim calls worse, which opens
the interval on that side); a run that failed, or has no record in the window, leaves its seed out with
the reason said. Window tests read a diverged run's records up to its stop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Literal, Mapping, Sequence

import numpy as np
import pandas as pd

from .claims import TEACHER, Claim, ClaimTest
from .inference import (ALPHA, Paired, Spending, Verdict, combine, decide, detectable, nominal_levels, t_interval,
                        undecidable)

TestState = Literal["decided", "open", "futile", "max", "claim decided"]
STATE_TEXT = {
    "decided": "decided",
    "open": "open",
    "futile": "stopped: the largest design could not decide it at today's estimate",
    "max": "stopped: the maximum number of seeds was reached",
    "claim decided": "stopped: another part already decided its claim",
}


# --------------------------------------------------------------------------- per-run values


def _series(metrics: pd.DataFrame, arm: str, key: str) -> pd.DataFrame:
    """Records of ``arm`` holding ``key``: columns seed, step, value (sorted by step)."""
    if key not in metrics.columns:
        return pd.DataFrame({"seed": pd.Series(dtype=int), "step": pd.Series(dtype=np.int64),
                             "value": pd.Series(dtype=float)})
    rows = metrics[(metrics["arm"] == arm) & metrics[key].notna()]
    return (pd.DataFrame({"seed": rows["seed"].to_numpy().astype(int), "step": rows["step"].to_numpy(),
                          "value": rows[key].to_numpy(dtype=float)})
            .sort_values(["seed", "step"], kind="stable").reset_index(drop=True))


def run_values(metrics: pd.DataFrame, statuses: pd.DataFrame, *, arm: str, key: str, reduce: str,
               window: tuple[int, int | None] | None, scale: str) -> tuple[dict[int, float], dict[int, str]]:
    """Per seed of ``arm``: the reduced value of ``key`` (``math.inf`` marks the missing final value of a
    diverged run: the worst outcome), or why there is none. Returns (seed -> value, seed -> reason)."""
    st = statuses[statuses["arm"] == arm]
    states = dict(zip(st["seed"].astype(int), st["state"].astype(str)))
    seeds = sorted(set(states) | {int(s) for s in metrics.loc[metrics["arm"] == arm, "seed"].unique()})
    if key not in metrics.columns or not metrics[key].notna().any():
        return {}, {seed: f"{arm} seed {seed}: no {key} record" for seed in seeds}
    s = _series(metrics, arm, key)
    if window is not None:
        start, end = window
        s = s[(s["step"] >= start) & ((s["step"] <= end) if end is not None else True)]
    values: dict[int, float] = {}
    missing: dict[int, str] = {}
    where = "" if window is None else f" in steps {window[0]}-{window[1] if window[1] is not None else 'end'}"
    for seed in seeds:
        v = s.loc[s["seed"] == seed, "value"].to_numpy()
        to_end = window is None or window[1] is None  # a window that closes earlier has its last value either way
        if reduce == "final" and to_end and not key.startswith("teacher/"):
            if states.get(seed) == "diverged":
                values[seed] = math.inf  # no final weights: the worst outcome (signed by the test, below)
                continue
            if states.get(seed) != "done":
                missing[seed] = f"{arm} seed {seed}: no final value (run {states.get(seed, 'not started')})"
                continue
        if v.size == 0:
            missing[seed] = f"{arm} seed {seed}: no {key} record{where}"
            continue
        x = float(v[-1] if reduce == "final" else v.max() if reduce == "max" else v.min() if reduce == "min"
                  else v.mean())
        if not math.isfinite(x):
            missing[seed] = f"{arm} seed {seed}: {key} {reduce} is {x}"
        elif scale == "log" and x <= 0:
            missing[seed] = f"{arm} seed {seed}: {key} {reduce} = {x:.3g} is not positive (log scale)"
        else:
            values[seed] = x
    return values, missing


@dataclass(frozen=True, slots=True)
class Pairs:
    """A test's paired differences over the seeds allowed, and why the other seeds are left out."""

    seeds: tuple[int, ...]
    d: np.ndarray
    excluded: tuple[str, ...]


def paired_values(metrics: pd.DataFrame, statuses: pd.DataFrame, test: ClaimTest, *,
               allowed: Iterable[int] | None = None) -> Pairs:
    """The paired differences of ``test`` (treatment - baseline, or their log-ratio) on the seeds in ``allowed``
    (None: every seed with runs)."""
    keep = None if allowed is None else set(int(s) for s in allowed)
    treat, miss_t = run_values(metrics, statuses, arm=test.treatment, key=test.metric, reduce=test.reduce,
                               window=test.window, scale=test.scale)
    if test.baseline == TEACHER:
        # the teacher line of the treatment's own run: every seed compares with the teacher it was distilled from
        base, miss_b = run_values(metrics, statuses, arm=test.treatment, key=test.baseline_metric, reduce="final",
                                  window=None, scale=test.scale)
        miss_b = {s: r.replace(f"{test.treatment} seed", "teacher line of seed", 1) for s, r in miss_b.items()}
    else:
        base, miss_b = run_values(metrics, statuses, arm=test.baseline, key=test.baseline_metric,
                                  reduce=test.reduce, window=test.window, scale=test.scale)
    if keep is not None:
        treat, base = {s: v for s, v in treat.items() if s in keep}, {s: v for s, v in base.items() if s in keep}
        miss_t, miss_b = {s: r for s, r in miss_t.items() if s in keep}, {s: r for s, r in miss_b.items() if s in keep}
    arms_present = set(statuses["arm"].astype(str)) | set(metrics["arm"].astype(str))
    excluded = [f"no runs of arm '{a}' in this grid" for a in dict.fromkeys((test.treatment, test.baseline))
                if a != TEACHER and a not in arms_present]
    unlogged = [k for k in dict.fromkeys((test.metric, test.baseline_metric))
                if k not in metrics.columns or not metrics[k].notna().any()]
    excluded += [f"no run of this grid logged {k}" for k in unlogged]
    excluded += [miss_t[s] for s in sorted(miss_t) if test.metric not in unlogged]
    excluded += [miss_b[s] for s in sorted(miss_b) if test.baseline_metric not in unlogged]
    base_name = "the teacher line" if test.baseline == TEACHER else test.baseline
    excluded += [f"{test.treatment} seed {s}: no run of {base_name} with this seed" for s in sorted(treat)
                 if s not in base and s not in miss_b]
    excluded += [f"{base_name} seed {s}: no run of {test.treatment} with this seed" for s in sorted(base)
                 if s not in treat and s not in miss_t]
    worse = 1.0 if test.direction == "decrease" else -1.0  # the sign of a difference the claim calls worse
    seeds, d = [], []
    for s in sorted(set(treat) & set(base)):
        a, b = treat[s], base[s]
        if math.isinf(a) and math.isinf(b):
            excluded.append(f"seed {s}: both runs diverged (no final value on either side)")
            continue
        seeds.append(s)
        if math.isinf(a):
            d.append(worse * math.inf)
        elif math.isinf(b):
            d.append(-worse * math.inf)
        else:
            d.append(math.log(a / b) if test.scale == "log" else a - b)
    return Pairs(seeds=tuple(seeds), d=np.array(d, float), excluded=tuple(excluded))


# --------------------------------------------------------------------------- one test at one look


@dataclass(frozen=True, slots=True)
class TestResult:
    """A test of a claim as it stands: its pairs, intervals, verdict, and whether it takes more seeds."""

    claim: int
    part: int
    test: ClaimTest
    text: str
    """The claim's sentence."""
    n: int
    seeds: tuple[int, ...]
    paired: Paired
    level_alpha: float
    """Two-sided nominal level of the decision interval (the test's share of alpha, spent at this look)."""
    lo: float
    hi: float
    """Decision interval (adjusted for the matrix's tests and the looks), analysis scale."""
    raw_lo: float
    raw_hi: float
    """Unadjusted 95% t-interval, analysis scale."""
    mde: float
    """Smallest effect the decision level detects at 80% power, analysis scale."""
    verdict: Verdict
    state: TestState
    looks: tuple[int, ...]
    """Pair counts of this test's looks so far."""
    excluded: tuple[str, ...]
    n_max: int

    @property
    def fold(self) -> bool:
        return self.test.scale == "log"

    def back(self, v: float) -> float:
        """A value of the analysis scale in the metric's terms (a fold on the log scale)."""
        if not self.fold or math.isnan(v):
            return v
        return math.exp(v) if math.isfinite(v) else (math.inf if v > 0 else 0.0)

    @property
    def effect(self) -> float:
        return self.back(self.paired.estimate)

    @property
    def stop_text(self) -> str:
        return STATE_TEXT[self.state]


def evaluate(test: ClaimTest, pairs: Pairs, *, claim: int, part: int, text: str, alpha_test: float, n_max: int,
             spending: Spending, prior_looks: Sequence[int] = ()) -> TestResult:
    """The test at a new look with ``pairs`` (``prior_looks``: the pair counts of its earlier looks)."""
    p = Paired.of(pairs.d)
    looks = tuple(prior_looks)
    n = p.n
    if n >= 2 and (not looks or n > looks[-1]):
        looks = looks + (min(n, n_max),)
    level = nominal_levels(looks, n_max, alpha_test, spending)[-1] if looks else alpha_test
    lo, hi = t_interval(p, level) if n >= 2 and level > 0 else (math.nan, math.nan)
    raw_lo, raw_hi = t_interval(p, ALPHA) if n >= 2 else (math.nan, math.nan)
    margin = None if test.tolerance is not None else test.bound()
    tol = test.bound() if test.tolerance is not None else None
    verdict = decide(lo, hi, direction=test.direction, margin=margin, tolerance=tol)
    if verdict != "inconclusive":
        state: TestState = "decided"
    elif n >= n_max:
        state = "max"
    elif undecidable(p, n_max=n_max, alpha=alpha_test, direction=test.direction, margin=margin, tolerance=tol):
        state = "futile"
    else:
        state = "open"
    return TestResult(claim=claim, part=part, test=test, text=text, n=n, seeds=pairs.seeds, paired=p,
                      level_alpha=level, lo=lo, hi=hi, raw_lo=raw_lo, raw_hi=raw_hi,
                      mde=detectable(p, level) if level > 0 else math.nan, verdict=verdict, state=state,
                      looks=looks, excluded=pairs.excluded, n_max=n_max)


def n_tests(claims: Sequence[Claim]) -> int:
    return sum(len(c.tests) for c in claims)


def alpha_per_test(claims: Sequence[Claim], alpha: float = ALPHA) -> float:
    """Bonferroni: every test of the matrix gets an equal share of the family-wise alpha."""
    k = n_tests(claims)
    return alpha / k if k else alpha


@dataclass
class Judgement:
    """Every test of a matrix's claims after some looks."""

    results: list[TestResult] = field(default_factory=list)
    alpha: float = ALPHA
    alpha_test: float = ALPHA
    spending: Spending = "pocock"
    n_max: int = 0

    def claim_verdicts(self) -> dict[int, Verdict]:
        out: dict[int, list[Verdict]] = {}
        for r in self.results:
            out.setdefault(r.claim, []).append(r.verdict)
        return {c: combine(v) for c, v in out.items()}

    def claim_open(self, claim: int) -> bool:
        parts = [r for r in self.results if r.claim == claim]
        return any(r.state == "open" for r in parts) and not any(r.verdict == "contradicted" for r in parts)


def judge_fixed(claims: Sequence[Claim], metrics: pd.DataFrame, statuses: pd.DataFrame, *,
                alpha: float = ALPHA) -> Judgement:
    """One look with every seed there is (a grid with a plain seed list): the fixed-sample Bonferroni intervals."""
    a_test = alpha_per_test(claims, alpha)
    out = Judgement(alpha=alpha, alpha_test=a_test, spending="pocock")
    for ci, c in enumerate(claims):
        for pi, t in enumerate(c.tests):
            pairs = paired_values(metrics, statuses, t)
            n = max(len(pairs.seeds), 2)
            out.results.append(evaluate(t, pairs, claim=ci, part=pi, text=c.text, alpha_test=a_test, n_max=n,
                                        spending="pocock"))
    out.n_max = max((r.n_max for r in out.results), default=0)
    return out


def arms_of(test: ClaimTest) -> tuple[str, ...]:
    return tuple(a for a in (test.treatment, test.baseline) if a != TEACHER)


def seeds_for(test: ClaimTest, targets: Mapping[str, int], seeds: Sequence[int]) -> list[int]:
    """The seeds a test may pair at a look: the first ``n`` seeds, n the smaller of its arms' targets."""
    n = min(targets.get(a, 0) for a in arms_of(test))
    return list(seeds[:n])


def sequential_look(claims: Sequence[Claim], metrics: pd.DataFrame, statuses: pd.DataFrame, *,
                    targets: Mapping[str, int], seeds: Sequence[int], previous: Judgement | None,
                    alpha: float, spending: Spending, n_max: int) -> Judgement:
    """The look after a wave whose arms ran ``targets`` seeds each: tests closed at an earlier look keep their
    result (a verdict is never re-decided); open ones are evaluated with the pairs they have now."""
    a_test = alpha_per_test(claims, alpha)
    before = {(r.claim, r.part): r for r in (previous.results if previous else [])}
    out = Judgement(alpha=alpha, alpha_test=a_test, spending=spending, n_max=n_max)
    for ci, c in enumerate(claims):
        for pi, t in enumerate(c.tests):
            old = before.get((ci, pi))
            if old is not None and old.state != "open":
                out.results.append(old)
                continue
            pairs = paired_values(metrics, statuses, t, allowed=seeds_for(t, targets, seeds))
            out.results.append(evaluate(t, pairs, claim=ci, part=pi, text=c.text, alpha_test=a_test, n_max=n_max,
                                        spending=spending, prior_looks=old.looks if old else ()))
    # a claim decided by one part (contradicted) stops its other parts
    for ci in {r.claim for r in out.results}:
        parts = [r for r in out.results if r.claim == ci]
        if any(r.verdict == "contradicted" for r in parts):
            out.results = [r if r.claim != ci or r.state != "open" else _closed(r) for r in out.results]
    return out


def _closed(r: TestResult) -> TestResult:
    return replace(r, state="claim decided")


def next_targets(judgement: Judgement, targets: Mapping[str, int], *, step: int, n_max: int) -> dict[str, int]:
    """The seeds each arm runs in the next wave: ``step`` more for the arms of every open test of an open claim
    (up to ``n_max``); the others keep theirs."""
    out = dict(targets)
    for r in judgement.results:
        if r.state != "open" or not judgement.claim_open(r.claim):
            continue
        for a in arms_of(r.test):
            out[a] = max(out[a], min(n_max, targets[a] + step))
    return out


def result_json(r: TestResult) -> dict[str, Any]:
    """What the sequential record keeps of a test at a look (the report recomputes and checks against it)."""
    return {"claim": r.claim, "part": r.part, "n": r.n, "seeds": list(r.seeds), "looks": list(r.looks),
            "mean": r.paired.mean, "sd": r.paired.sd, "level_alpha": r.level_alpha, "lo": r.lo, "hi": r.hi,
            "verdict": r.verdict, "state": r.state}
