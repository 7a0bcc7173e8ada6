"""Verdicts on the claims a matrix declares: paired effects, 95% t-intervals, one word each.

For every test of a claim (``harness.claims.ClaimTest``) each run is reduced to one
number (the metric's final value, or its max/min/mean over a step window), runs are
paired by seed, and the paired differences are summarised:

- ``scale: diff``: d_i = treatment_i - baseline_i;
- ``scale: log``: d_i = ln(treatment_i / baseline_i), reported back as a fold change
  exp(mean d) (the ratio of the geometric means; grad norms and FD live on this scale).

With n pairs, mean d̄ and sample SD s (ddof 1), the 95% interval is the paired
t-interval d̄ ± t(0.975, n-1) · s/√n. The smallest effect these seeds could have
detected is the minimum detectable effect of the two-sided paired t-test at
alpha = 0.05 and 80% power, MDE = (t(0.975, n-1) + t(0.80, n-1)) · s/√n (the
standard central-t approximation; a fold exp(MDE) on the log scale).

Verdict of a test (the claim predicts ``direction``):

- no tolerance: *supported* when the whole interval lies on the predicted side of 0,
  *contradicted* when it lies wholly on the other side, *inconclusive* otherwise;
- ``tolerance`` (non-inferiority, margin m = tolerance, or ln(tolerance) on the log
  scale): with u = the effect in the "worse" direction, *supported* when the interval's
  upper end of u is below m, *contradicted* when its lower end is above m, *inconclusive*
  otherwise;
- fewer than 2 pairs: *inconclusive* (no interval).

A claim of several tests is supported when every test is, contradicted when any test
is, inconclusive otherwise. A run without a value (no record in the window; no final
value because the run diverged or failed and so has no final weights; a non-finite or,
on the log scale, non-positive value) leaves its seed out, and the entry says which and
why: a seed is never silently dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

from harness.claims import TEACHER, Claim, ClaimTest

from .data import GridData
from .stats import fmt_fold, fmt_num

if TYPE_CHECKING:
    from .plots import FigureOut

Verdict = Literal["supported", "contradicted", "inconclusive"]
LEVEL = 0.95
POWER = 0.80
ALPHA = 1 - LEVEL
RULE = ("Verdict rule: with no tolerance, supported when the whole 95% interval lies on the side of 0 the claim "
        "predicts, contradicted when it lies wholly on the other side, inconclusive when it contains 0; with a "
        "tolerance (non-inferiority), supported when the interval's worse end stays within the margin, "
        "contradicted when even its better end is beyond it, inconclusive otherwise; fewer than 2 paired seeds: "
        "inconclusive. A claim of several parts is supported when every part is, contradicted when any part is.")
METHOD = ("Each run is reduced to one number (final value, or max/min/mean over the stated step window); runs are "
          "paired by seed. Differences: treatment - baseline (scale diff), or log(treatment/baseline) reported as "
          "a fold change xR = exp(mean log-ratio) (scale log). Interval: the paired t-interval "
          "mean ± t(0.975, n-1)·SD/√n. Smallest detectable effect: the minimum detectable effect of the two-sided "
          "paired t-test at alpha 0.05 and 80% power, MDE = (t(0.975, n-1) + t(0.80, n-1))·SD/√n, from the paired "
          "SD and n (a fold exp(MDE) on the log scale). A final value (to the end of the run) exists only for runs "
          "that were not stopped: a diverged or failed run has no final weights.")


@dataclass(frozen=True, slots=True)
class PartResult:
    claim: str
    part: int
    """0-based index of the test within its claim."""
    test: ClaimTest
    n: int
    """Paired seeds with a value on both sides."""
    seeds: tuple[int, ...]
    mean: float
    """Mean paired difference (log scale: mean log-ratio)."""
    sd: float
    lo: float
    hi: float
    mde: float
    """Minimum detectable effect at 80% power (same scale as ``mean``)."""
    verdict: Verdict
    excluded: tuple[str, ...]
    """Why each left-out seed has no pair ('rl_hard seed 2: no final value (run diverged)')."""

    @property
    def fold(self) -> bool:
        """The effect is a fold change (``scale: log``), read back from the mean log-ratio."""
        return self.test.scale == "log"

    def _back(self, v: float) -> float:
        return math.exp(v) if self.fold and math.isfinite(v) else v

    @property
    def effect(self) -> float:
        """The effect in the metric's terms: the mean difference, or the fold change on the log scale."""
        return self._back(self.mean)

    @property
    def effect_interval(self) -> tuple[float, float]:
        """The 95% interval in the metric's terms (a fold-change interval on the log scale)."""
        return self._back(self.lo), self._back(self.hi)

    def effect_text(self) -> str:
        """'+0.12 [+0.05, +0.19]' or 'x0.42 [x0.30, x0.59] (fold)'; '[n/a]' without an interval, 'n/a' without
        a mean. The one wording the table, the sentences and the figure's reader see."""
        if not math.isfinite(self.mean):
            return "n/a"
        if self.n >= 2 and self.sd == 0 and self.mean == 0:
            return "none: equal values on every seed"
        fmt = fmt_fold if self.fold else (lambda v: fmt_num(v, signed=True))
        lo, hi = self.effect_interval
        interval = f"[{fmt(lo)}, {fmt(hi)}]" if math.isfinite(self.lo) and math.isfinite(self.hi) else "[n/a]"
        return f"{fmt(self.effect)} {interval}" + (" (fold)" if self.fold else "")

    def mde_text(self) -> str:
        if not math.isfinite(self.mde):
            return "n/a"
        if self.sd == 0:
            return "any (the paired differences do not vary)"
        return f"{fmt_fold(math.exp(self.mde))} either way" if self.fold else f"±{fmt_num(self.mde)}"


# --------------------------------------------------------------------------- per-run values


def _series(data: GridData, arm: str, key: str) -> pd.DataFrame:
    """Records of ``arm`` holding ``key``: columns seed, step, value (sorted by step)."""
    m = data.metrics
    if key not in m.columns:
        return pd.DataFrame({"seed": pd.Series(dtype=int), "step": pd.Series(dtype=np.int64),
                             "value": pd.Series(dtype=float)})
    rows = m[(m["arm"] == arm) & m[key].notna()]
    return (pd.DataFrame({"seed": rows["seed"].to_numpy(), "step": rows["step"].to_numpy(),
                          "value": rows[key].to_numpy(dtype=float)})
            .sort_values(["seed", "step"], kind="stable").reset_index(drop=True))


def run_values(data: GridData, *, arm: str, key: str, reduce: str, window: tuple[int, int | None] | None,
               scale: str) -> tuple[dict[int, float], dict[int, str]]:
    """Per seed of ``arm``: the reduced value of ``key``, or why there is none.

    Returns (seed -> value, seed -> reason for the seeds without a usable value).
    """
    st = data.statuses[data.statuses["arm"] == arm]
    states = dict(zip(st["seed"].astype(int), st["state"].astype(str)))
    seeds = sorted(set(states) | set(int(s) for s in data.metrics.loc[data.metrics["arm"] == arm, "seed"].unique()))
    s = _series(data, arm, key)
    if window is not None:
        start, end = window
        s = s[(s["step"] >= start) & ((s["step"] <= end) if end is not None else True)]
    values: dict[int, float] = {}
    missing: dict[int, str] = {}
    where = "" if window is None else f" in steps {window[0]}-{window[1] if window[1] is not None else 'end'}"
    for seed in seeds:
        v = s.loc[s["seed"] == seed, "value"].to_numpy()
        to_end = window is None or window[1] is None  # a window that closes earlier has its last value either way
        if reduce == "final" and to_end and not key.startswith("teacher/") and states.get(seed) in ("diverged",
                                                                                                     "failed"):
            missing[seed] = f"{arm} seed {seed}: no final value (run {states[seed]})"
            continue
        if v.size == 0:
            missing[seed] = f"{arm} seed {seed}: no {key} record{where}"
            continue
        x = float(v[-1] if reduce == "final" else v.max() if reduce == "max" else v.min() if reduce == "min"
                  else v.mean())
        if not math.isfinite(x):
            missing[seed] = f"{arm} seed {seed}: {key} {reduce} is {x}"
        elif scale == "log" and x <= 0:
            missing[seed] = f"{arm} seed {seed}: {key} {reduce} = {fmt_num(x)} is not positive (log scale)"
        else:
            values[seed] = x
    return values, missing


# --------------------------------------------------------------------------- statistics


def paired_t(d: np.ndarray) -> tuple[float, float, float, float, float]:
    """(mean, SD, lo, hi, MDE) of paired differences ``d``: 95% t-interval, MDE at 80% power, alpha 0.05.

    Fewer than 2 differences: the mean only (SD, interval and MDE are nan).
    """
    d = np.asarray(d, float)
    n = d.size
    if n == 0:
        return (math.nan,) * 5
    mean = float(d.mean())
    if n < 2:
        return mean, math.nan, math.nan, math.nan, math.nan
    sd = float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    t_half = float(sps.t.ppf(1 - ALPHA / 2, n - 1))
    t_power = float(sps.t.ppf(POWER, n - 1))
    return mean, sd, mean - t_half * se, mean + t_half * se, (t_half + t_power) * se


def rule_verdict(test: ClaimTest, *, n: int, lo: float, hi: float) -> Verdict:
    """The documented rule (module docstring) on an interval [lo, hi] of the paired effect."""
    if n < 2 or not (math.isfinite(lo) and math.isfinite(hi)):
        return "inconclusive"
    sign = 1.0 if test.direction == "increase" else -1.0
    if test.tolerance is None:
        if sign * lo > 0 and sign * hi > 0:
            return "supported"
        if sign * lo < 0 and sign * hi < 0:
            return "contradicted"
        return "inconclusive"
    margin = math.log(test.tolerance) if test.scale == "log" else test.tolerance
    worse = sorted((-sign * lo, -sign * hi))  # the interval of the effect in the "worse" direction
    if worse[1] < margin:
        return "supported"
    if worse[0] > margin:
        return "contradicted"
    return "inconclusive"


def claim_verdict(parts: Sequence[Verdict]) -> Verdict:
    if parts and all(p == "supported" for p in parts):
        return "supported"
    if any(p == "contradicted" for p in parts):
        return "contradicted"
    return "inconclusive"


def evaluate_test(data: GridData, claim: Claim, part: int) -> PartResult:
    test = claim.tests[part]
    treat, miss_t = run_values(data, arm=test.treatment, key=test.metric, reduce=test.reduce, window=test.window,
                               scale=test.scale)
    if test.baseline == TEACHER:
        # the teacher line of the treatment's own run: every seed compares with the teacher it was distilled from
        base, miss_b = run_values(data, arm=test.treatment, key=test.baseline_metric, reduce="final", window=None,
                                  scale=test.scale)
        miss_b = {s: r.replace(f"{test.treatment} seed", "teacher line of seed", 1) for s, r in miss_b.items()}
    else:
        base, miss_b = run_values(data, arm=test.baseline, key=test.baseline_metric, reduce=test.reduce,
                                  window=test.window, scale=test.scale)
    seeds = sorted(set(treat) & set(base))
    excluded = [f"no runs of arm '{a}' in this grid" for a in dict.fromkeys((test.treatment, test.baseline))
                if a != TEACHER and a not in data.arms]
    unlogged = [k for k in dict.fromkeys((test.metric, test.baseline_metric)) if not data.has(k)]
    # a key no run logged (a grid run before the trainer wrote it): one line, not one per seed
    excluded += [f"no run of this grid logged {k}" for k in unlogged]
    excluded += [miss_t[s] for s in sorted(miss_t) if test.metric not in unlogged]
    excluded += [miss_b[s] for s in sorted(miss_b) if test.baseline_metric not in unlogged]
    base_name = "the teacher line" if test.baseline == TEACHER else test.baseline
    excluded += [f"{test.treatment} seed {s}: no run of {base_name} with this seed" for s in sorted(treat)
                 if s not in base and s not in miss_b]
    excluded += [f"{base_name} seed {s}: no run of {test.treatment} with this seed" for s in sorted(base)
                 if s not in treat and s not in miss_t]
    a = np.array([treat[s] for s in seeds], float)
    b = np.array([base[s] for s in seeds], float)
    d = np.log(a / b) if test.scale == "log" else a - b
    mean, sd, lo, hi, mde = paired_t(d)
    return PartResult(claim=claim.text, part=part, test=test, n=len(seeds), seeds=tuple(seeds), mean=mean, sd=sd,
                      lo=lo, hi=hi, mde=mde, verdict=rule_verdict(test, n=len(seeds), lo=lo, hi=hi),
                      excluded=tuple(excluded))


def evaluate_claims(data: GridData, claims: Sequence[Claim]) -> list[list[PartResult]]:
    """One list of test results per claim."""
    return [[evaluate_test(data, c, i) for i in range(len(c.tests))] for c in claims]


# --------------------------------------------------------------------------- display


def predicted(test: ClaimTest) -> str:
    """What the test expects, in words: 'decrease' or 'at most x1.5 worse'."""
    if test.tolerance is None:
        return test.direction
    worse = "higher" if test.direction == "decrease" else "lower"
    margin = fmt_fold(test.tolerance) if test.scale == "log" else fmt_num(test.tolerance)
    return f"not {worse} by more than {margin}"


@dataclass(frozen=True, slots=True)
class VerdictRow:
    """One test of a claim with what its claim as a whole came to: what every writer of the section reads."""

    result: PartResult
    claim_verdict: Verdict
    parts: int
    """Tests of the claim."""

    @property
    def label(self) -> str:
        """The claim, with '(part i/n)' when it has several tests."""
        r = self.result
        return r.claim + (f" (part {r.part + 1}/{self.parts})" if self.parts > 1 else "")


def verdict_rows(results: Sequence[Sequence[PartResult]]) -> list[VerdictRow]:
    """Every test in claim order, each with its claim's verdict (computed once per claim)."""
    rows = []
    for parts in results:
        overall = claim_verdict([r.verdict for r in parts])
        rows += [VerdictRow(result=r, claim_verdict=overall, parts=len(parts)) for r in parts]
    return rows


def verdict_table(results: Sequence[Sequence[PartResult]]) -> pd.DataFrame:
    return pd.DataFrame([{
        "claim": row.label,
        "verdict": row.claim_verdict if row.result.part == 0 else "",
        "treatment vs baseline": f"{row.result.test.treatment} vs {row.result.test.baseline}",
        "metric (per run)": row.result.test.describe(),
        "predicted": predicted(row.result.test),
        "effect [95% CI]": row.result.effect_text(),
        "n": row.result.n,
        "part verdict": row.result.verdict,
        "smallest detectable (80% power)": row.result.mde_text(),
        "left out": "; ".join(row.result.excluded) or "—",
    } for row in verdict_rows(results)])


def verdict_sentences(results: Sequence[Sequence[PartResult]]) -> list[str]:
    out = []
    for parts in results:
        rows = verdict_rows([parts])
        bits = []
        for row in rows:
            r, t = row.result, row.result.test
            seeds = f"n={r.n} paired seed{'s' if r.n != 1 else ''}"
            mde = "" if not math.isfinite(r.mde) else f"; detectable at 80% power: {r.mde_text()}"
            left = "" if not r.excluded else f"; left out: {'; '.join(r.excluded)}"
            bits.append(f"{t.treatment} vs {t.baseline}, {t.describe()}, predicted {predicted(t)}: "
                        f"{r.effect_text()} ({seeds}{mde}{left}) -> {r.verdict}")
        out.append(f"{parts[0].claim}: {rows[0].claim_verdict.upper()}. " + "; ".join(bits) + ".")
    return out


def verdict_csv(results: Sequence[Sequence[PartResult]]) -> pd.DataFrame:
    """Every number of the section at full precision (verdicts.csv)."""
    rows = []
    for row in verdict_rows(results):
        r, t = row.result, row.result.test
        lo, hi = r.effect_interval
        rows.append({"claim": r.claim, "part": r.part, "claim_verdict": row.claim_verdict, "verdict": r.verdict,
                     "treatment": t.treatment, "baseline": t.baseline, "metric": t.metric,
                     "baseline_metric": t.baseline_metric, "reduce": t.reduce,
                     "window_start": t.window[0] if t.window else None,
                     "window_end": t.window[1] if t.window else None, "direction": t.direction,
                     "scale": t.scale, "tolerance": t.tolerance, "n": r.n,
                     "seeds": ",".join(map(str, r.seeds)), "mean": r.mean, "sd": r.sd, "lo": r.lo, "hi": r.hi,
                     "mde": r.mde, "effect": r.effect, "effect_lo": lo, "effect_hi": hi,
                     "excluded": "; ".join(r.excluded)})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- where the claims come from


def grid_claims(grid_dir: Path | None) -> tuple[tuple[Claim, ...], str]:
    """The claims of the matrix the grid was run from (the harness keeps them in the grid manifest), and a
    sentence saying where they came from, or why there are none."""
    from harness import collect
    from twinflow_train.rundir import RunDirError

    if grid_dir is None:
        return (), "the data were not read from a grid directory"
    try:
        manifest = collect.grid_manifest(grid_dir)
    except RunDirError as e:
        return (), f"the grid manifest does not load ({e})"
    if manifest is None:
        return (), ("no grid manifest (the grid was run before the harness wrote one; "
                    "'twinflow-lab report --claims MATRIX' judges a matrix file's claims)")
    if manifest.get("kind") == "search":
        return (), f"the runs were made by search spec {manifest.get('source')}, which has no claims"
    claims = tuple(Claim.from_json(c) for c in manifest.get("claims") or [])
    if not claims:
        return (), f"matrix file {manifest.get('source')} declares no claims"
    return claims, f"matrix file {manifest.get('source')} (grid manifest)"


# --------------------------------------------------------------------------- figure

VERDICT_COLORS = {"supported": "tab:green", "contradicted": "tab:red", "inconclusive": "tab:gray"}


def verdict_figure(results: Sequence[Sequence[PartResult]]) -> "FigureOut | None":
    """One row per test: the paired effect and its 95% interval against no effect, the band of effects these
    seeds could not have detected (±MDE), and the non-inferiority margin where there is one."""
    from .plots import FigureOut, fixed_margins, new_figure, render

    rows = [row for row in verdict_rows(results) if math.isfinite(row.result.mean)]
    parts = [row.result for row in rows]
    if not parts:
        return None
    fig = new_figure(width=7.5, height=0.75 + 0.62 * len(parts))
    fixed_margins(fig, left=0.3, right=0.3, top=0.3, bottom=0.45, hspace=1.6)
    axes = fig.subplots(len(parts), 1, squeeze=False)[:, 0]
    for ax, row in zip(axes, rows):
        r = row.result
        log = r.fold
        null = 1.0 if log else 0.0
        to_axis = math.exp if log else (lambda v: v)
        est = to_axis(r.mean)
        has_ci = math.isfinite(r.lo) and math.isfinite(r.hi)
        if math.isfinite(r.mde):
            ax.axvspan(to_axis(-r.mde), to_axis(r.mde), color="0.9", zorder=0)
        ax.axvline(null, color="black", linewidth=0.8)
        if r.test.tolerance is not None:
            sign = 1.0 if r.test.direction == "increase" else -1.0
            margin = -sign * (math.log(r.test.tolerance) if log else r.test.tolerance)
            ax.axvline(to_axis(margin), color="tab:red", linestyle="--", linewidth=1)
        color = VERDICT_COLORS[r.verdict]
        if has_ci:
            ax.errorbar([est], [0], xerr=[[est - to_axis(r.lo)], [to_axis(r.hi) - est]], fmt="o", color=color,
                        capsize=3, markersize=5)
        else:
            ax.plot([est], [0], "o", color=color, markersize=5)
        if log:
            from matplotlib.ticker import FuncFormatter, LogLocator

            ax.set_xscale("log")
            lo, hi = ax.get_xlim()
            # a narrow range (folds near 1) needs ticks between the powers of ten to be readable
            subs = (1.0, 1.5, 2.0, 3.0, 5.0, 7.0) if hi / lo < 30 else (1.0,)
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_fold(v)))
            ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.set_yticks([])
        ax.tick_params(labelsize=7)
        part = f" (part {r.part + 1}/{row.parts})" if row.parts > 1 else ""
        ax.set_title(f"{r.claim[:70]}{part}: "
                     f"{r.test.treatment} vs {r.test.baseline}, {r.test.metric} "
                     f"({'fold' if log else 'difference'}), n={r.n} -> {r.verdict}", fontsize=7, loc="left")
    caption = ("Each test's paired effect (dot) with its 95% t-interval; black line: no effect; grey band: effects "
               "smaller than these seeds could detect at 80% power (±MDE); dashed red: the non-inferiority margin; "
               "colour: the test's verdict (green supported, red contradicted, grey inconclusive). Fold changes on "
               "a log axis.")
    return FigureOut("verdicts", "Claims: paired effects", caption, render(fig),
                     {"tests": [[r.claim, r.part, r.verdict] for r in parts]})
