"""Verdicts on the claims a matrix declares: the table that opens a report, its sentences, CSV and figure.

The numbers come from ``harness.verdicts`` (per-run values, paired differences, looks) and
``harness.inference`` (intervals, the four verdicts, the error control): the same code the sequential
grid decides with, so a report never reads a claim differently from the grid that ran it. A grid with a
sequential seed plan is judged by replaying its recorded looks (``<grid>/.harness/sequential.json``);
a grid with a plain seed list has one look with every seed.

Per test the report shows the verdict's decision interval (adjusted: the test's share of the family-wise
alpha, spent over its looks) and, beside it, the unadjusted 95% t-interval of the same pairs; the margin
that decided it; the seeds it used and why it stopped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd
from matplotlib.ticker import FuncFormatter, LogLocator

from harness import collect
from harness.claims import Claim, ClaimTest
from harness.inference import ALPHA, POWER, Verdict
from harness.sequential import SeedPlan, read_record, replay
from harness.verdicts import Judgement, TestResult, judge_fixed
from twinflow_train.rundir import RunDirError

from .data import GridData, shown_path
from .plots import FigureOut, fixed_margins, new_figure
from .formatting import fmt_fold, fmt_num

LEVEL = 1 - ALPHA
RULE = ("Verdicts: no meaningful effect when the whole decision interval lies inside the margin both ways (an "
        "equivalence test; it wins even where the interval excludes no change); supported when it lies on the side "
        "the claim predicts, contradicted when on the other side; inconclusive otherwise. A non-inferiority test "
        "(tolerance) is supported when the interval's worse end stays within its margin, contradicted when even "
        "its better end is beyond it. A claim of several parts is contradicted when any part is, no meaningful "
        "effect when a part is, supported when every part is.")
METHOD = ("Each run is reduced to one number (final value, or max/min/mean over the stated step window); runs are "
          "paired by seed. Differences: treatment - baseline (scale diff), or log(treatment/baseline) reported as "
          "a fold change xR = exp(mean log-ratio) (scale log). A run that diverged has no final weights: on a "
          "final-value test it is the worst outcome, which opens the interval on that side. Error control: "
          f"every verdict of the matrix is right with probability at least {LEVEL:.0%} together. Each of the K "
          "tests gets alpha/K (Bonferroni: the decision intervals are simultaneous, and one interval decides "
          "direction and equivalence alike), spent over the test's looks by an alpha-spending function when the "
          "grid gives seeds in waves. Decision interval: the paired t-interval at that level; the unadjusted 95% "
          "t-interval of the same pairs stands beside it. Smallest detectable: the effect the decision level "
          f"detects with {POWER:.0%} power at this n and SD. harness/inference.py gives the details.")


def effect_text(r: TestResult, lo: float, hi: float) -> str:
    """'+0.12 [+0.05, +0.19]' or 'x0.42 [x0.30, x0.59]'; '[n/a]' without an interval, 'n/a' without a mean."""
    est = r.paired.estimate
    if math.isnan(est):
        return "n/a"
    if r.n >= 2 and r.paired.sd == 0 and r.paired.mean == 0 and r.paired.finite == r.n:
        return "none: equal values on every seed"
    fmt = fmt_fold if r.fold else (lambda v: fmt_num(v, signed=True))
    interval = f"[{fmt(r.back(lo))}, {fmt(r.back(hi))}]" if not (math.isnan(lo) or math.isnan(hi)) else "[n/a]"
    return f"{fmt(r.back(est))} {interval}"


def margin_text(t: ClaimTest) -> str:
    if t.tolerance is not None:
        worse = "higher" if t.direction == "decrease" else "lower"
        m = fmt_fold(t.tolerance) if t.scale == "log" else fmt_num(t.tolerance)
        return f"non-inferiority: at most {m} {worse}"
    if t.margin is None:
        return "none (no equivalence verdict)"
    return f"within {fmt_fold(t.margin)} either way" if t.scale == "log" else f"within ±{fmt_num(t.margin)}"


def margin_short(t: ClaimTest) -> str:
    """The margin in the verdict table's few words: 'x1.1 either way', '±0.05 either way', 'x1.5 worse at most'."""
    if t.tolerance is not None:
        m = fmt_fold(t.tolerance) if t.scale == "log" else fmt_num(t.tolerance)
        return f"{m} worse at most"
    if t.margin is None:
        return "none"
    return f"{fmt_fold(t.margin) if t.scale == 'log' else '±' + fmt_num(t.margin)} either way"


def predicted(test: ClaimTest) -> str:
    """What the test expects, in words: 'decrease' or 'not higher by more than x1.5'."""
    if test.tolerance is None:
        return test.direction
    worse = "higher" if test.direction == "decrease" else "lower"
    margin = fmt_fold(test.tolerance) if test.scale == "log" else fmt_num(test.tolerance)
    return f"not {worse} by more than {margin}"


STOP_SHORT = {"decided": "decided", "open": "open", "futile": "futile", "max": "max reached",
              "claim decided": "claim decided"}
"""A test's state in a word or two, for the verdict table (the detail table says it in full)."""


def seeds_text(r: TestResult) -> str:
    """'3 (max reached)', '4 (decided, looks at n=3/4)': the seeds a test used and how it ended."""
    looks = f", looks at n={'/'.join(map(str, r.looks))}" if len(r.looks) > 1 else ""
    return f"{r.n} ({STOP_SHORT.get(r.state, r.stop_text)}{looks})"


def mde_text(r: TestResult) -> str:
    if not math.isfinite(r.mde):
        return "n/a"
    if r.paired.sd == 0:
        return "any (the paired differences do not vary)"
    return f"{fmt_fold(math.exp(r.mde))} either way" if r.fold else f"±{fmt_num(r.mde)}"


def judge(data: GridData, claims: Sequence[Claim]) -> tuple[Judgement, str]:
    """The judgement of ``claims`` on ``data`` and a sentence on how: the grid's recorded looks when it ran a
    sequential plan with these claims, else one look with every seed."""
    record = None
    if data.grid_dir is not None:
        try:
            record = read_record(data.grid_dir)
        except RunDirError as e:
            return judge_fixed(claims, data.metrics, data.statuses), f"the sequential record does not load ({e}); " \
                "one look with every seed"
    if record and record.get("looks") and record.get("claims") == [c.text for c in claims]:
        plan = SeedPlan(**record["plan"])
        judgement, problems = replay(claims, data.metrics, data.statuses, plan=plan, looks=record["looks"])
        how = (f"sequential: seeds {plan.first} to {plan.max} in waves of {plan.step}, {len(record['looks'])} "
               f"looks, {plan.spending} alpha spending")
        if problems:
            how += "; WARNING, the runs no longer give the recorded decisions: " + "; ".join(problems[:3])
        assert judgement is not None
        return judgement, how
    j = judge_fixed(claims, data.metrics, data.statuses)
    return j, "one look with every seed of the grid"


@dataclass(frozen=True, slots=True)
class VerdictRow:
    """One test of a claim with what its claim as a whole came to."""

    result: TestResult
    claim_verdict: Verdict
    parts: int

    @property
    def label(self) -> str:
        r = self.result
        return r.text + (f" (part {r.part + 1}/{self.parts})" if self.parts > 1 else "")


def verdict_rows(judgement: Judgement) -> list[VerdictRow]:
    verdicts = judgement.claim_verdicts()
    counts: dict[int, int] = {}
    for r in judgement.results:
        counts[r.claim] = counts.get(r.claim, 0) + 1
    return [VerdictRow(result=r, claim_verdict=verdicts[r.claim], parts=counts[r.claim]) for r in judgement.results]


def verdict_table(judgement: Judgement) -> pd.DataFrame:
    """The first screen of a report: claim, verdict, effect with its decision interval, margin, seeds used."""
    rows = []
    for row in verdict_rows(judgement):
        r, t = row.result, row.result.test
        rows.append({
            "claim": row.label,
            "verdict": row.claim_verdict if r.part == 0 else "",
            "test": f"{t.treatment} vs {t.baseline}: {t.describe()}",
            "effect [decision interval]": effect_text(r, r.lo, r.hi),
            "unadjusted 95%": effect_text(r, r.raw_lo, r.raw_hi).split(" ", 1)[-1] if r.n >= 2 else "n/a",
            "margin": margin_short(t),
            "seeds": seeds_text(r),
            "part verdict": r.verdict,
        })
    return pd.DataFrame(rows)


def detail_table(judgement: Judgement) -> pd.DataFrame:
    """What stands behind each row: the prediction, the level, the detectable effect, the seeds left out."""
    return pd.DataFrame([{
        "claim": row.label, "predicted": predicted(row.result.test), "margin": margin_text(row.result.test),
        "decision level (two-sided)": f"{row.result.level_alpha:.2g}",
        f"smallest detectable ({POWER:.0%} power)": mde_text(row.result),
        "seeds: why it stopped": row.result.stop_text,
        "left out": "; ".join(row.result.excluded) or "—",
    } for row in verdict_rows(judgement)])


def verdict_sentences(judgement: Judgement) -> list[str]:
    out = []
    by_claim: dict[int, list[VerdictRow]] = {}
    for row in verdict_rows(judgement):
        by_claim.setdefault(row.result.claim, []).append(row)
    for rows in by_claim.values():
        bits = []
        for row in rows:
            r, t = row.result, row.result.test
            left = "" if not r.excluded else f"; left out: {'; '.join(r.excluded)}"
            bits.append(f"{t.treatment} vs {t.baseline}, {t.describe()}, predicted {predicted(t)}, margin "
                        f"{margin_text(t)}: {effect_text(r, r.lo, r.hi)} (decision level {r.level_alpha:.2g}; "
                        f"unadjusted 95% {effect_text(r, r.raw_lo, r.raw_hi)}; n={r.n}, {r.stop_text}{left}) -> "
                        f"{r.verdict}")
        out.append(f"{rows[0].result.text}: {rows[0].claim_verdict.upper()}. " + "; ".join(bits) + ".")
    return out


def verdict_csv(judgement: Judgement) -> pd.DataFrame:
    """Every number of the section at full precision (verdicts.csv)."""
    rows = []
    for row in verdict_rows(judgement):
        r, t = row.result, row.result.test
        rows.append({"claim": r.text, "part": r.part, "claim_verdict": row.claim_verdict, "verdict": r.verdict,
                     "state": r.state, "treatment": t.treatment, "baseline": t.baseline, "metric": t.metric,
                     "baseline_metric": t.baseline_metric, "reduce": t.reduce,
                     "window_start": t.window[0] if t.window else None,
                     "window_end": t.window[1] if t.window else None, "direction": t.direction,
                     "scale": t.scale, "tolerance": t.tolerance, "margin": t.margin, "n": r.n,
                     "seeds": ",".join(map(str, r.seeds)), "looks": "/".join(map(str, r.looks)),
                     "mean": r.paired.mean, "sd": r.paired.sd, "level_alpha": r.level_alpha, "lo": r.lo, "hi": r.hi,
                     "raw_lo": r.raw_lo, "raw_hi": r.raw_hi, "mde": r.mde, "effect": r.effect,
                     "effect_lo": r.back(r.lo), "effect_hi": r.back(r.hi), "excluded": "; ".join(r.excluded)})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- where the claims come from


def grid_claims(grid_dir: Path | None) -> tuple[tuple[Claim, ...], str]:
    """The claims of the matrix the grid was run from (the harness keeps them in the grid manifest), and a
    sentence saying where they came from, or why there are none."""
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
        spec = shown_path(manifest.get("source"), grid_dir)
        return (), f"the runs were made by search spec {spec}, which has no claims"
    claims = tuple(Claim.from_json(c) for c in manifest.get("claims") or [])
    if not claims:
        return (), f"matrix file {shown_path(manifest.get('source'), grid_dir)} declares no claims"
    return claims, f"matrix file {shown_path(manifest.get('source'), grid_dir)} (grid manifest)"


# --------------------------------------------------------------------------- figure

VERDICT_COLORS = {"supported": "tab:green", "contradicted": "tab:red", "no meaningful effect": "tab:blue",
                  "inconclusive": "tab:gray"}


def _short(text: str, width: int = 44) -> str:
    """A claim's text cut to ``width`` characters (an ellipsis where cut), for the forest plot's row labels."""
    return text if len(text) <= width else text[:width - 1].rstrip() + "…"


def verdict_figure(judgement: Judgement) -> FigureOut | None:
    """A forest plot: one row per test, its effect with the decision interval (thick) and the unadjusted 95%
    interval (thin), the margins drawn; one shared axis per scale (folds on a log axis, differences linear)."""
    rows = [row for row in verdict_rows(judgement) if not math.isnan(row.result.paired.estimate)]
    if not rows:
        return None
    groups = [g for g in ([r for r in rows if r.result.fold], [r for r in rows if not r.result.fold]) if g]
    fig = new_figure(width=8.0, height=0.9 + 0.4 * len(rows) + 0.5 * len(groups))
    fixed_margins(fig, left=3.2, right=0.3, top=0.35, bottom=0.5, hspace=0.9)
    axes = fig.subplots(len(groups), 1, squeeze=False, gridspec_kw={"height_ratios": [len(g) for g in groups]})[:, 0]
    for ax, group in zip(axes, groups):
        log = group[0].result.fold
        ax.axvline(1.0 if log else 0.0, color="black", linewidth=0.8)
        labels = []
        for y, row in enumerate(reversed(group)):
            r, t = row.result, row.result.test
            color = VERDICT_COLORS[r.verdict]
            est = r.back(r.paired.estimate)
            big = 1e12 if log else 1e12
            clamp = (lambda v: min(max(v, 1 / big), big)) if log else (lambda v: min(max(v, -big), big))
            for lo, hi, lw in ((r.raw_lo, r.raw_hi, 1.0), (r.lo, r.hi, 3.0)):
                if not (math.isnan(lo) or math.isnan(hi)):
                    ax.plot([clamp(r.back(lo)), clamp(r.back(hi))], [y, y], color=color, linewidth=lw,
                            solid_capstyle="butt")
            ax.plot([clamp(est)], [y], "o", color=color, markersize=4)
            b = t.bound()
            if b is not None:
                sign = 1.0 if t.direction == "increase" else -1.0
                marks = [-sign * b] if t.tolerance is not None else [-b, b]
                for m in marks:
                    ax.plot([r.back(m)] * 2, [y - 0.35, y + 0.35], color="tab:red", linestyle="--", linewidth=0.9)
            labels.append(f"{_short(r.text)}{f' (part {r.part + 1}/{row.parts})' if row.parts > 1 else ''}\n"
                          f"{t.treatment} vs {t.baseline}")
        ax.set_yticks(range(len(group)))
        ax.set_yticklabels(labels, fontsize=6.5)
        ax.set_ylim(-0.6, len(group) - 0.4)
        ax.tick_params(axis="x", labelsize=7)
        if log:
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_fold(v)))
            ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
            ax.set_xlabel("fold change, treatment / baseline (log axis)", fontsize=7)
        else:
            ax.set_xlabel("difference, treatment - baseline", fontsize=7)
    caption = ("Each test's paired effect (dot) with its decision interval (thick: adjusted for the matrix's tests "
               "and the looks) and the unadjusted 95% interval (thin); black line: no effect; dashed red: the margin "
               "(both ways) or the non-inferiority bound; colour: the test's verdict (green supported, red "
               "contradicted, blue no meaningful effect, grey inconclusive). Fold changes share one log axis, "
               "differences one linear axis.")
    return FigureOut("verdicts", "Claims: paired effects", caption, fig,
                     {"tests": [[r.result.text, r.result.part, r.result.verdict] for r in rows]})
