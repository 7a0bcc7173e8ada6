"""Second stage of a report: the words. ``document(numbers)`` turns ``compute``'s tables into sections.

Every sentence, caption and table header of the report is written here (the verdicts' table and sentences by
``reports.verdict``'s text functions, a study's by ``reports.study``), and the figures are drawn beside the words
that explain them. Nothing here computes a statistic: the numbers come from ``reports.compute``.

The page opens on the verdicts (a matrix's grid) or on the study (a search's trials), then the numbers per arm,
the curves and samples, the runs; the method text comes last.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .compute import Comparison, ReportNumbers
from .plots import BAND_LABEL, curve_figures
from .render import Document, Section
from .samples import sample_grid_figure
from .formatting import fmt_diff, fmt_int, fmt_num
from .stats import LOWER_BETTER, SAMPLE_METRICS, excludes_zero
from .study import study_section
from .verdict import (
    METHOD,
    RULE,
    detail_table,
    verdict_figure,
    verdict_sentences,
    verdict_table,
)

DIFFERENCES = ("Differences: arm minus baseline over seeds present in both (paired by seed), with the unadjusted "
               "95% paired t-interval of the verdicts' engine (harness/inference.py); '*' marks an interval that "
               "excludes 0. These comparisons are exploratory: only the verdicts control their error over the "
               "matrix. With fewer than 2 pairs there is no interval (n/a). Relative differences (%) are the "
               "geometric-mean ratio - 1 (paired log-ratios); beyond 10x (or below 1/10) all three numbers are "
               "written as fold changes instead.")
SUMMARY = ("Final = the last validation of a run that was not stopped (a diverged or failed run has no final "
           "weights, so it has no final values); best = each run's lowest validation loss, diverged runs included. "
           "FD is lower-better; reward and accuracy higher-better; spikes are the trainer's spike-detector events "
           "(count/spikes); the max grad norm is the largest pre-clip norm of a run.")


def fmt_seconds(s: float) -> str:
    if s is None or not math.isfinite(s):
        return "—"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def _cell(summary: pd.DataFrame, arm: str, key: str, fmt=fmt_num) -> str:
    if key not in summary.columns:
        return "—"
    v = summary.loc[arm, key]
    n = summary.loc[arm, key + ":n"] if key + ":n" in summary.columns else None
    text = fmt(v)
    if n is not None and n < summary.loc[arm, "runs"] and text != "—":
        text += f" (n={int(n)})"  # fewer seeds than runs contributed: say so beside the mean
    return text


def _arm_label(arm: str, baseline: str | None) -> str:
    return arm + (" (baseline)" if arm == baseline else "")


def summary_display(summary: pd.DataFrame, *, nfe: Sequence[int], primary_nfe: int | None, baseline: str | None
                    ) -> pd.DataFrame:
    """Per arm, what the runs reached: validation loss and the sample metrics (the first Summary table)."""
    rows = []
    for arm in summary.index:
        s = summary.loc[arm]
        row = {"arm": _arm_label(arm, baseline),
               "runs done": f"{int(s['done'])}/{int(s['runs'])}",
               "best val loss": _cell(summary, arm, "best_val_loss"),
               "best at step": fmt_int(s.get("best_val_step")),
               "final val loss": _cell(summary, arm, "final_val_loss")}
        for n in nfe:
            row[f"FD@{n}"] = _cell(summary, arm, f"fd_nfe{n}")
        for n in nfe:
            if f"kid_nfe{n}" in summary.columns:  # runs from before KID was written have none
                row[f"KID@{n}"] = _cell(summary, arm, f"kid_nfe{n}")
        if primary_nfe is not None:
            for what in (w for w in SAMPLE_METRICS if w not in LOWER_BETTER):  # reward, accuracy, gold/proxy
                if what in ("reward", "accuracy") or f"{what}_nfe{primary_nfe}" in summary.columns:
                    row[f"{what}@{primary_nfe}"] = _cell(summary, arm, f"{what}_nfe{primary_nfe}")
        rows.append(row)
    return pd.DataFrame(rows)


def stability_display(summary: pd.DataFrame, *, baseline: str | None) -> pd.DataFrame:
    """Per arm, how the runs went: gradients, spikes, divergence, time (the second Summary table)."""
    rows = []
    for arm in summary.index:
        s = summary.loc[arm]
        rows.append({"arm": _arm_label(arm, baseline),
                     "max grad norm": _cell(summary, arm, "max_grad_norm"),
                     "spikes/run": _cell(summary, arm, "spikes"),
                     "diverged": f"{int(s['diverged'])}/{int(s['runs'])}" + (
                         f" (+{int(s['failed'])} failed)" if s["failed"] else ""),
                     "diverged at step": fmt_int(s["median_diverge_step"]),
                     "wall time/run": _cell(summary, arm, "wall_s", fmt=fmt_seconds)})
    return pd.DataFrame(rows)


PAGE_PX = 1300
"""Width a table may take on the page (the report's 1,400-px column less its padding)."""


def _column_px(df: pd.DataFrame, col) -> float:
    """Estimated width of a column at the tables' 13-px font: its longest cell, or its header's longest word
    (headers wrap), plus the cell's padding."""
    cells = df[col].astype(str).str.len().max() if len(df) else 0
    head = max((len(w) for w in str(col).split()), default=0)
    return 7.5 * max(cells, head) + 16


def split_columns(df: pd.DataFrame, *, keep: int = 1, width: float = PAGE_PX) -> list[pd.DataFrame]:
    """``df`` as tables that each fit ``width`` pixels: its first ``keep`` columns in every one, the others
    packed in order (a ladder's differences have a column per arm)."""
    head = list(df.columns[:keep])
    used = sum(_column_px(df, c) for c in head)
    parts: list[list] = [[]]
    room = width - used
    for c in df.columns[keep:]:
        w = _column_px(df, c)
        if parts[-1] and w > room:
            parts.append([])
            room = width - used
        parts[-1].append(c)
        room -= w
    return [df[head + cols] for cols in parts if cols]


def diff_display(diffs: pd.DataFrame, arms: Sequence[str]) -> pd.DataFrame:
    if diffs.empty:
        return pd.DataFrame()
    rows = []
    for arm in arms:
        d = diffs[diffs["arm"] == arm]
        if d.empty:
            continue
        n_max = int(d["n_pairs"].max())
        row = {"arm": arm, "paired seeds": n_max}
        for _, r in d.iterrows():  # one per metric
            flag = "" if r["n_pairs"] == n_max else f" (n={int(r['n_pairs'])})"
            if excludes_zero(r["excludes_zero"]):
                flag += " *"
            row[r["metric"]] = fmt_diff(r) + flag
        rows.append(row)
    # one column per arm: a ladder has fewer arms than metrics, and each cell is long
    return pd.DataFrame(rows).set_index("arm").T.rename_axis("metric").reset_index()


def sample_metrics_display(runs: pd.DataFrame, arms: Sequence[str], nfe: Sequence[int], teacher: dict) -> pd.DataFrame:
    rows = []
    whats = [w for w in SAMPLE_METRICS
             if w in ("fd", "reward", "accuracy") or any(f"{w}_nfe{n}" in runs.columns for n in nfe)]
    names = {w: {"fd": "FD", "kid": "KID"}.get(w, w) for w in whats}
    blank = {f"{names[w]} {which}": "—" for w in whats for which in ("final", "best")}
    tsteps = teacher.get("teacher/steps")
    rows.append({"arm": "teacher" + (f" ({int(tsteps)} steps)" if tsteps and math.isfinite(tsteps) else ""),
                 # steps, not NFE: a guided teacher step costs two evaluations
                 "NFE": f"{fmt_int(tsteps)} steps" if tsteps and math.isfinite(tsteps) else "—",
                 **blank, **{f"{names[w]} final": fmt_num(teacher.get(f"teacher/{w}")) for w in whats}})
    g = runs.groupby(level="arm", observed=True, sort=False)

    def mean(key: str, arm: str) -> str:
        if key not in runs.columns:
            return "—"
        v = runs[key].where(np.isfinite(runs[key].astype(float)))
        return fmt_num(v.groupby(level="arm", observed=True).mean().get(arm, math.nan))

    for n in nfe:
        euler = teacher.get(f"teacher/fd_euler{n}")
        if euler is not None and math.isfinite(euler):
            row = {"arm": "teacher, Euler", "NFE": str(n), **blank, "FD final": fmt_num(euler)}
            if "kid" in whats:
                row["KID final"] = fmt_num(teacher.get(f"teacher/kid_euler{n}"))
            rows.append(row)
    for arm in arms:
        if arm not in g.groups:
            continue
        for n in nfe:
            row = {"arm": arm, "NFE": str(n)}
            for what in whats:
                row[f"{names[what]} final"] = mean(f"{what}_nfe{n}", arm)
                row[f"{names[what]} best"] = mean(f"{what}_nfe{n}@best", arm)
            rows.append(row)
    return pd.DataFrame(rows)


def runs_display(runs: pd.DataFrame, primary_nfe: int | None, divergence: pd.DataFrame | None
                 ) -> list[tuple[str, pd.DataFrame]]:
    """The runs, one row each, in two tables that fit the page: where each run ended and what it reached; its
    gradients, divergence and time."""
    idx = {"arm": runs.index.get_level_values("arm").astype(str), "seed": runs.index.get_level_values("seed")}
    ended = pd.DataFrame({**idx, "state": runs["state"].to_numpy(),
                          "reason": runs["reason"].fillna("").astype(str).to_numpy(),
                          "last step": [fmt_int(v) for v in runs["last_step"]]})
    if "fork" in runs.columns and runs["fork"].notna().any():
        ended["first steps shared with"] = runs["fork"].fillna("—").astype(str).to_numpy()
    for key, label, f in (("best_val_loss", "best val loss", fmt_num), ("best_val_step", "best at step", fmt_int),
                          ("final_val_loss", "final val loss", fmt_num),
                          (f"fd_nfe{primary_nfe}", f"FD@{primary_nfe}", fmt_num)):
        if key in runs.columns:
            ended[label] = [f(v) for v in runs[key]]
    health = pd.DataFrame(idx)
    for key, label, f in (("max_grad_norm", "max grad norm", fmt_num), ("spikes", "spikes", fmt_int),
                          ("nonfinite_steps", "non-finite steps", fmt_int)):
        if key in runs.columns:
            health[label] = [f(v) for v in runs[key]]
    health["wall time"] = [fmt_seconds(v) for v in runs["wall_s"]]
    # the harness's divergence summary adds what the table above lacks: where values first went
    # non-finite, and from which validation on the loss kept rising (spikes and max norm are already here)
    wanted = {"first_nonfinite_step": "first non-finite step", "val_rise_step": "val loss rising from step"}
    if divergence is not None and len(divergence) and {"arm", "seed", *wanted} <= set(divergence.columns):
        extra = pd.DataFrame({"arm": divergence["arm"].astype(str), "seed": divergence["seed"].astype(int)})
        for key, label in wanted.items():
            extra[label] = [fmt_int(v) for v in divergence[key]]
        if "val_rise_k" in divergence.columns and len(set(divergence["val_rise_k"])) == 1:
            k = int(divergence["val_rise_k"].iloc[0])
            extra = extra.rename(columns={wanted["val_rise_step"]: f"val loss rising ({k} in a row) at step"})
        health = health.merge(extra, on=["arm", "seed"], how="left").fillna("—")
    return [("Where each run ended and what it reached (final: the last validation of a run that was not "
             "stopped).", ended),
            ("Gradients (pre-clip norms), divergence and time of each run.", health)]


# --------------------------------------------------------------------------- findings


def _direction(row) -> str:
    if row["better"] == "none" or not excludes_zero(row["excludes_zero"]):
        return ""
    lower = row["hi"] < 0
    good = lower if row["better"] == "lower" else not lower
    return " (better)" if good else " (worse)"


def _part(row: pd.Series, n_max: int) -> str:
    """'FD@2 +0.4 [-1.2, 2.0]', with '(n=k)' when fewer seeds paired for this metric than for others."""
    n = "" if row["n_pairs"] == n_max else f" (n={int(row['n_pairs'])})"
    return f"{row['metric']}{n} {fmt_diff(row)}{_direction(row)}"


def findings(comparisons: Sequence[Comparison], summary: pd.DataFrame, *, primary_nfe: int | None) -> list[str]:
    """One sentence per comparison of an arm with the arm it extends (``compute.Comparison``).

    The sentence always names max grad norm, FD/reward at the primary NFE and best val loss, then every other
    metric whose unadjusted 95% interval excludes zero. These are exploratory comparisons: the claims' verdicts
    (first section) are the ones whose error is controlled."""
    head = ["max_grad_norm"]
    if primary_nfe is not None:
        head += [f"fd_nfe{primary_nfe}", f"reward_nfe{primary_nfe}"]
    head += ["best_val_loss"]
    out = []
    for comp in comparisons:
        arm, prev, c = comp.arm, comp.ref, comp.table
        if c.empty:
            continue
        c = c.set_index("key")
        shown = [k for k in head if k in c.index and math.isfinite(c.loc[k, "estimate"])]
        shown += [k for k in c.index if k not in shown and excludes_zero(c.loc[k, "excludes_zero"])]
        n = int(c["n_pairs"].max())
        parts = [_part(c.loc[k], n) for k in shown]
        flagged = [c.loc[k, "metric"] for k in shown if excludes_zero(c.loc[k, "excludes_zero"])]
        if n < 2:
            verdict = "fewer than 2 paired seeds, so no interval (n/a)"
        elif flagged:
            verdict = "unadjusted 95% interval excludes 0 for " + ", ".join(flagged)
        else:
            verdict = "no unadjusted interval excludes 0"
        div = ""
        da, dp = summary.loc[arm], summary.loc[prev]
        if da["diverged"] or dp["diverged"]:
            div = f"; diverged {int(da['diverged'])}/{int(da['runs'])} vs {int(dp['diverged'])}/{int(dp['runs'])}"
        npairs = f"{n} paired seed{'s' if n != 1 else ''}"
        body = ", ".join(parts) if parts else "no metric with values in both arms"
        out.append(f"{arm} vs {prev} ({npairs}): {body}; {verdict}{div}.")
    return out


def _no_findings(numbers: ReportNumbers) -> str:
    """What the Findings section says when no arm is compared with another: why, in the grid's terms."""
    arms = numbers.arms
    if len(arms) == 1:
        return "A single arm: nothing to compare."
    if numbers.comparisons:
        return "No metric has values in both arms of any comparison."
    where = (f"; the Summary's differences compare each arm with the baseline '{numbers.baseline}'"
             if numbers.baseline is not None else "")
    return (f"No arm extends another in the matrix (each of the {len(arms)} arms is a root), so there is no step "
            f"up a ladder to compare{where}.")


# --------------------------------------------------------------------------- sections


def _slug_ok(slug: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", slug)


def verdict_section(numbers: ReportNumbers) -> Section:
    """The claims and their verdicts: the table, the forest plot right under it, the sentences, the details."""
    judgement, source = numbers.judgement, numbers.claims_source
    if not judgement.results:
        return Section("Verdicts", anchor="verdicts",
                       paragraphs=[f"No claims to judge: {source or 'none given'}. A matrix declares them in a "
                                   "'claims:' block (docs/harness.md); 'twinflow-lab report --claims MATRIX' takes "
                                   "them from another file."])
    fig = verdict_figure(judgement)
    k = len(judgement.results)
    return Section("Verdicts", anchor="verdicts",
                   lead=[("", verdict_table(judgement))],
                   lead_figures=[fig] if fig is not None else [],
                   paragraphs=[(f"Claims from {source}. " if source else "Claims given to the report. ")
                               + f"{k} tests; each decided at level {judgement.alpha:.2g}/{k} = "
                               f"{judgement.alpha_test:.2g} (two-sided), spent over its looks ({numbers.judged_how}); "
                               "the verdict rule and the method are at the end of the report."],
                   bullets=verdict_sentences(judgement),
                   tables=[("What stands behind each row.", detail_table(judgement))])


def summary_section(numbers: ReportNumbers, notes: list[str]) -> Section:
    primary, baseline = numbers.primary_nfe, numbers.baseline
    what = "trial group" if numbers.is_search else "arm"
    sec = Section("Summary", anchor="summary",
                  paragraphs=[f"Per {what}, means over seeds of each run's values; FD, reward and accuracy of the "
                              "final weights" + (f" (reward and accuracy at {primary} NFE; every NFE, final and "
                                                 "best, in the Samples section)" if primary else "")
                              + "; best at step: the median over seeds. The method section defines each value."],
                  bullets=notes,
                  tables=[("What the runs reached.", summary_display(numbers.summary, nfe=numbers.nfe,
                                                                    primary_nfe=primary, baseline=baseline)),
                          ("How the runs went.", stability_display(numbers.summary, baseline=baseline))])
    dd = diff_display(numbers.diffs, numbers.arms)
    if not dd.empty:
        parts = split_columns(dd)
        for i, part in enumerate(parts):
            caption = (f"Differences against the baseline '{baseline}' (arm - baseline; "
                       "[unadjusted 95% paired t-interval]; * interval excludes 0; "
                       "(n=k) fewer pairs than the column's; exploratory, not verdicts)."
                       if i == 0 else f"Differences against the baseline '{baseline}', continued.")
            sec.tables.append((caption, part))
    return sec


def study_sections(numbers: ReportNumbers) -> list[Section]:
    fmt4 = lambda v: fmt_num(v, sig=4) if isinstance(v, float) else v  # noqa: E731
    out = []
    for study in numbers.studies:
        sec = study_section(study)
        tables = [("Trials.", sec.table.map(fmt4))]
        if sec.front is not None:
            tables.insert(0, ("Pareto-optimal trials, by the first objective; metrics beside the objectives are "
                              "recorded from the same evaluation, not optimised.", sec.front.map(fmt4)))
        out.append(Section(f"Optuna study '{sec.name}'", anchor=f"study-{_slug_ok(sec.name)}",
                           paragraphs=[sec.summary], figures=sec.figures, tables=tables))
    return out


def about_text(numbers: ReportNumbers, title_note: str = "") -> list[str]:
    data, runs, arms = numbers.data, numbers.runs, numbers.arms
    seeds = sorted({int(s) for s in runs.index.get_level_values("seed")})
    states = runs["state"].value_counts().to_dict()
    counts = f"seeds {seeds}, {len(runs)} runs (" + ", ".join(f"{v} {k}" for k, v in sorted(states.items())) + ")"
    if numbers.is_search:
        text = (f"Search '{data.name}': {len(arms)} trial groups, {counts}. Trial groups in order: {', '.join(arms)} "
                f"(source: {data.arm_order_source}). "
                + (f"Differences are taken against '{numbers.baseline}', as asked." if numbers.baseline is not None
                   else "No baseline: the study ranks the trials (Optuna section); they are not a ladder."))
    else:
        text = (f"Grid '{data.name}': {len(arms)} arms, {counts}. Arm order: {', '.join(arms)} "
                f"(source: {data.arm_order_source}). Baseline arm: {numbers.baseline}.")
    return ([title_note] if title_note else []) + [text]


def method_section(numbers: ReportNumbers) -> Section:
    paragraphs = [SUMMARY]
    if numbers.baseline is not None:
        paragraphs.append(DIFFERENCES)
    if numbers.judgement.results:
        paragraphs += [METHOD, RULE]
    return Section("Method", anchor="method", paragraphs=paragraphs)


def document(numbers: ReportNumbers, *, title_note: str = "") -> Document:
    """The report's sections, in reading order, from ``compute``'s numbers."""
    data, arms, runs, teacher = numbers.data, numbers.arms, numbers.runs, numbers.teacher
    notes = []
    spread = {k: v for k, v in numbers.teacher_spread.items() if v > 1e-9 * max(1.0, abs(teacher.get(k, 0.0)))}
    if spread:
        notes.append("Teacher metrics differ across runs (not one shared teacher?): "
                     + ", ".join(f"{k} spread {fmt_num(v)}" for k, v in spread.items()) + "; the mean is shown.")
    if runs["state"].isin(["diverged", "failed"]).any():
        notes.append("Means over seeds use the runs with a finite value; '(n=k)' after a value says how many seeds "
                     "that was when fewer than all.")

    curves = curve_figures(data, band=numbers.band, max_points=numbers.max_points)
    statuses = _resolve_run_dirs(data.statuses, data.grid_dir)
    tsteps = teacher.get("teacher/steps")
    sample_figs = [f for which in ("final", "best")
                   if (f := sample_grid_figure(statuses, arms=arms, nfe=numbers.nfe, which=which,
                                               teacher_steps=tsteps, seed=numbers.sample_seed)) is not None]
    verdicts = verdict_section(numbers)
    rest = [summary_section(numbers, notes)]
    if not numbers.is_search:
        rest.append(Section("Findings", anchor="findings",
                            paragraphs=["Each arm against the arm it extends in the matrix (where the grid manifest "
                                        "records it; otherwise the arm before it in the ladder order), computed from "
                                        "the paired seeds."],
                            bullets=findings(numbers.comparisons, numbers.summary, primary_nfe=numbers.primary_nfe)
                            or [_no_findings(numbers)]))
    rest += [Section("Curves", anchor="curves", figures=curves,
                     paragraphs=[f"Mean over seeds, {BAND_LABEL[numbers.band]}, at most {numbers.max_points} step "
                                 "bins per curve."]),
             Section("Samples", anchor="samples", figures=sample_figs,
                     paragraphs=[] if sample_figs else ["No run has sample files (samples/*-nfe<n>.npz)."],
                     tables=[("Sample metrics per NFE, final and best weights (means over seeds); the teacher at "
                              "its full step count.", sample_metrics_display(runs, arms, numbers.nfe, teacher))]),
             Section("Runs", anchor="runs", tables=runs_display(runs, numbers.primary_nfe, data.divergence))]
    studies = study_sections(numbers)
    if not numbers.is_search:
        sections = [verdicts, *rest, *studies]
    elif numbers.judgement.results:  # claims given to a search's report: judged first, then the study
        sections = [verdicts, *studies, *rest]
    else:  # a study opens on its trials, front and best; "no claims" is a note at the end
        sections = [*studies, *rest, verdicts]
    sections += [method_section(numbers), Section("About this grid", anchor="about",
                                                  paragraphs=about_text(numbers, title_note))]
    kind = "study" if numbers.is_search else "comparison"
    return Document(title=f"TwinFlow {kind} report: {data.name}", intro=[], sections=sections)


def _resolve_run_dirs(statuses: pd.DataFrame, grid_dir: Path | None) -> pd.DataFrame:
    """Run directories as the sample grids open them: a relative one is under the grid directory."""
    def fix(rd):
        if not isinstance(rd, str) or not rd:
            return None
        p = Path(rd)
        if not p.is_absolute() and grid_dir is not None and not p.exists():
            p = grid_dir / p
        return str(p)

    return statuses.assign(run_dir=statuses["run_dir"].map(fix))

