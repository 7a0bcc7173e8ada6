"""Build a grid's comparison report: report.html (self-contained), report.md + PNGs, and CSVs of the numbers."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ._io import atomic_write_bytes, atomic_write_text
from .data import GridData, load_grid
from .plots import BAND_LABEL, BANDS, Band, curve_figures
from .render import Document, Section, figures_of, to_html, to_markdown
from .samples import sample_grid_figure
from .stats import (
    SAMPLE_METRICS,
    arm_table,
    compare_all,
    excludes_zero,
    findings,
    fmt_diff,
    fmt_int,
    fmt_num,
    metric_specs,
    resolve_primary_nfe,
    run_table,
    teacher_spread,
    teacher_values,
)
from .verdict import (
    METHOD,
    RULE,
    detail_table,
    grid_claims,
    judge,
    verdict_csv,
    verdict_figure,
    verdict_sentences,
    verdict_table,
)

if TYPE_CHECKING:
    import optuna

    from harness.claims import Claim

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


def summary_display(summary: pd.DataFrame, *, nfe: Sequence[int], primary_nfe: int | None, baseline: str
                    ) -> pd.DataFrame:
    rows = []
    for arm in summary.index:
        s = summary.loc[arm]
        row = {"arm": arm + (" (baseline)" if arm == baseline else ""),
               "runs done": f"{int(s['done'])}/{int(s['runs'])}",
               "best val loss": _cell(summary, arm, "best_val_loss"),
               "step of best (median)": fmt_int(s.get("best_val_step")),
               "final val loss": _cell(summary, arm, "final_val_loss")}
        for n in nfe:
            row[f"FD@{n}"] = _cell(summary, arm, f"fd_nfe{n}")
        if primary_nfe is not None:
            for what in SAMPLE_METRICS[1:]:  # reward, accuracy, and gold/proxy where the runs write them
                if what in ("reward", "accuracy") or f"{what}_nfe{primary_nfe}" in summary.columns:
                    row[f"{what}@{primary_nfe}"] = _cell(summary, arm, f"{what}_nfe{primary_nfe}")
        row["max pre-clip grad norm"] = _cell(summary, arm, "max_grad_norm")
        row["spikes per run"] = _cell(summary, arm, "spikes")
        row["diverged"] = f"{int(s['diverged'])}/{int(s['runs'])}" + (
            f" (+{int(s['failed'])} failed)" if s["failed"] else "")
        row["median divergence step"] = fmt_int(s["median_diverge_step"])
        row["wall time per run"] = _cell(summary, arm, "wall_s", fmt=fmt_seconds)
        rows.append(row)
    return pd.DataFrame(rows)


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
    names = {w: "FD" if w == "fd" else w for w in whats}
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
            rows.append({"arm": "teacher, Euler", "NFE": str(n), **blank, "FD final": fmt_num(euler)})
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


def runs_display(runs: pd.DataFrame, primary_nfe: int | None, divergence: pd.DataFrame | None) -> pd.DataFrame:
    out = pd.DataFrame({
        "arm": runs.index.get_level_values("arm").astype(str), "seed": runs.index.get_level_values("seed"),
        "state": runs["state"].to_numpy(),
        "reason": runs["reason"].fillna("").astype(str).to_numpy(),
        "last step": [fmt_int(v) for v in runs["last_step"]],
    })
    if "fork" in runs.columns and runs["fork"].notna().any():
        out["first steps shared with"] = runs["fork"].fillna("—").astype(str).to_numpy()
    for key, label, f in (("best_val_loss", "best val loss", fmt_num), ("best_val_step", "step of best", fmt_int),
                          ("final_val_loss", "final val loss", fmt_num),
                          (f"fd_nfe{primary_nfe}", f"FD@{primary_nfe}", fmt_num),
                          ("max_grad_norm", "max grad norm", fmt_num), ("spikes", "spikes", fmt_int),
                          ("nonfinite_steps", "non-finite steps", fmt_int)):
        if key in runs.columns:
            out[label] = [f(v) for v in runs[key]]
    out["wall time"] = [fmt_seconds(v) for v in runs["wall_s"]]
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
        out = out.merge(extra, on=["arm", "seed"], how="left").fillna("—")
    return out


def verdict_section(judgement, *, source: str, how: str) -> Section:
    """The claims and their verdicts (first in the report): the table, the forest plot, the sentences, the method."""
    if not judgement.results:
        return Section("Verdicts", anchor="verdicts",
                       paragraphs=[f"No claims to judge: {source or 'none given'}. A matrix declares them in a "
                                   "'claims:' block (docs/harness.md); 'twinflow-lab report --claims MATRIX' takes "
                                   "them from another file."])
    fig = verdict_figure(judgement)
    k = len(judgement.results)
    return Section("Verdicts", anchor="verdicts",
                   lead=[("", verdict_table(judgement))],
                   tables=[("What stands behind each row.", detail_table(judgement))],
                   figures=[fig] if fig is not None else [],
                   bullets=verdict_sentences(judgement),
                   paragraphs=[f"Claims from {source}." if source else "Claims given to the report.",
                               f"{k} tests; each decided at level {judgement.alpha:.2g}/{k} = "
                               f"{judgement.alpha_test:.2g} (two-sided), spent over its looks ({how}).",
                               METHOD, RULE])


def _resolve_run_dirs(statuses: pd.DataFrame, grid_dir: Path | None) -> pd.DataFrame:
    def fix(rd):
        if not isinstance(rd, str) or not rd:
            return None
        p = Path(rd)
        if not p.is_absolute() and grid_dir is not None and not p.exists():
            p = grid_dir / p
        return str(p)

    return statuses.assign(run_dir=statuses["run_dir"].map(fix))


def _slug_ok(slug: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", slug)


def write_report(data: GridData, *, out_dir: str | Path, baseline: str | None = None, band: Band = "minmax",
                 max_points: int = 400, primary_nfe: int | None = None,
                 sample_seed: int | None = None, studies: Sequence["optuna.Study"] = (), title_note: str = "",
                 claims: Sequence["Claim"] | None = None, claims_source: str = "", progress: bool = True) -> Path:
    """Compute and write the report of ``data`` into ``out_dir``; returns the path of report.html.

    ``claims``: the claims the verdict section judges; None takes them from the matrix file the runs were
    made from (``claims_source`` says where given ones came from).
    """
    if band not in BANDS:
        raise ValueError(f"band must be one of {BANDS} (got {band!r})")
    if max_points < 10:
        raise ValueError(f"max_points must be >= 10 (got {max_points})")
    arms = data.arms
    baseline = arms[0] if baseline is None else baseline
    if baseline not in arms:
        raise ValueError(f"baseline arm {baseline!r} is not in the grid; arms: {list(arms)}")
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    bar = tqdm(total=6, desc="report", disable=not progress)

    nfe = data.nfe
    primary = resolve_primary_nfe(nfe, primary_nfe)
    specs = metric_specs(nfe, primary)
    runs = run_table(data)
    summary = arm_table(runs, arms, specs)
    diffs = compare_all(runs, arms=arms, baseline=baseline, specs=specs)
    pairs = [(prev, arm) for arm in arms if (prev := data.predecessor(arm)) is not None]
    found = findings(runs, summary, pairs=pairs, specs=specs, primary_nfe=primary)
    teacher = teacher_values(data)
    statuses = _resolve_run_dirs(data.statuses, data.grid_dir)
    if claims is None:
        claims, claims_source = grid_claims(data.grid_dir)
    judgement, how = judge(data, claims)
    bar.update(1)

    curves = curve_figures(data, band=band, max_points=max_points)
    bar.update(1)
    tsteps = teacher.get("teacher/steps")
    sample_figs = [f for which in ("final", "best")
                   if (f := sample_grid_figure(statuses, arms=arms, nfe=nfe, which=which, teacher_steps=tsteps,
                                               seed=sample_seed)) is not None]
    bar.update(1)
    study_secs = []
    if studies:
        from .study import study_section

        study_secs = [study_section(s) for s in studies]
    bar.update(1)

    # ------------------------------------------------------------------ document
    seeds = sorted({int(s) for s in runs.index.get_level_values("seed")})
    states = runs["state"].value_counts().to_dict()
    intro = [f"Grid '{data.name}'" + (f" ({data.grid_dir})" if data.grid_dir else "") + f": {len(arms)} arms, "
             f"seeds {seeds}, {len(runs)} runs ("
             + ", ".join(f"{v} {k}" for k, v in sorted(states.items()))
             + f"). Arm order: {', '.join(arms)} (source: {data.arm_order_source}). Baseline arm: {baseline}.",
             f"Curves: mean over seeds, {BAND_LABEL[band]}, at most {max_points} step bins per curve. "
             f"Differences: arm minus baseline over seeds present in both (paired by seed), with the unadjusted "
             f"95% paired t-interval of the verdicts' engine (harness/inference.py); '*' marks an interval that "
             f"excludes 0. These comparisons are exploratory: only the verdicts control their error over the "
             f"matrix. With fewer than 2 pairs there is no interval (n/a). Relative differences (%) are the "
             f"geometric-mean ratio - 1 (paired log-ratios); beyond 10x (or below 1/10) all three numbers are "
             f"written as fold changes instead."]
    if title_note:
        intro.insert(0, title_note)
    notes = []
    spread = {k: v for k, v in teacher_spread(data).items() if v > 1e-9 * max(1.0, abs(teacher.get(k, 0.0)))}
    if spread:
        notes.append("Teacher metrics differ across runs (not one shared teacher?): "
                     + ", ".join(f"{k} spread {fmt_num(v)}" for k, v in spread.items()) + "; the mean is shown.")
    if runs["state"].isin(["diverged", "failed"]).any():
        notes.append("Means over seeds use the runs with a finite value; '(n=k)' after a value says how many seeds "
                     "that was when fewer than all.")

    summary_sec = Section("Summary", anchor="summary",
                          paragraphs=["Per arm, means over seeds of each run's values. Final = the last validation "
                                      "of a run that was not stopped (a diverged or failed run has no final weights, "
                                      "so it has no final values); best = each run's lowest validation loss, "
                                      "diverged runs included. "
                                      "FD, reward and accuracy are those of the final weights"
                                      + (f" (reward and accuracy at {primary} NFE; every NFE, final and best, in "
                                         "the Samples section)" if primary else "")
                                      + ". FD is lower-better; reward and accuracy higher-better; spikes are the "
                                      "trainer's spike-detector events (count/spikes)."],
                          bullets=notes,
                          tables=[("", summary_display(summary, nfe=nfe, primary_nfe=primary, baseline=baseline))])
    dd = diff_display(diffs, arms)
    if not dd.empty:
        summary_sec.tables.append((f"Differences against the baseline '{baseline}' (arm - baseline; "
                                   "[unadjusted 95% paired t-interval]; * interval excludes 0; "
                                   "(n=k) fewer pairs than the column's; exploratory, not verdicts).", dd))
    sections = [verdict_section(judgement, source=claims_source, how=how), summary_sec,
                Section("Findings", anchor="findings",
                        paragraphs=["Each arm against the arm it extends in the matrix (where the grid manifest records it; "
                                    "otherwise the arm before it in the ladder order), computed from the paired seeds."],
                        bullets=found or ["A single arm: nothing to compare."]),
                Section("Curves", anchor="curves", figures=curves),
                Section("Samples", anchor="samples", figures=sample_figs,
                        paragraphs=[] if sample_figs else ["No run has sample files (samples/*-nfe<n>.npz)."],
                        tables=[("Sample metrics per NFE, final and best weights (means over seeds); the teacher at "
                                 "its full step count.", sample_metrics_display(runs, arms, nfe, teacher))]),
                Section("Runs", anchor="runs", tables=[("", runs_display(runs, primary, data.divergence))])]
    fmt4 = lambda v: fmt_num(v, sig=4) if isinstance(v, float) else v  # noqa: E731
    for sec in study_secs:
        tables = [("Trials.", sec.table.map(fmt4))]
        if sec.front is not None:
            tables.insert(0, ("Pareto-optimal trials, by the first objective; metrics beside the objectives are "
                              "recorded from the same evaluation, not optimised.", sec.front.map(fmt4)))
        sections.append(Section(f"Optuna study '{sec.name}'", anchor=f"study-{_slug_ok(sec.name)}",
                                paragraphs=[sec.summary], figures=sec.figures, tables=tables))
    sections.append(Section("About this grid", anchor="about", paragraphs=intro))
    doc = Document(title=f"TwinFlow comparison report: {data.name}", intro=[], sections=sections)

    # ------------------------------------------------------------------ files
    out_dir.mkdir(parents=True, exist_ok=True)
    names = {}
    for f in figures_of(doc):
        names[f.slug] = f"{_slug_ok(f.slug)}.png"
        atomic_write_bytes(out_dir / names[f.slug], f.png)
    atomic_write_text(out_dir / "report.md", to_markdown(doc, image_names=names))
    _publish_csv(summary, out_dir / "summary.csv")
    _publish_csv(runs, out_dir / "runs.csv")
    _publish_csv(diffs, out_dir / "differences.csv", index=False)
    _publish_csv(verdict_csv(judgement), out_dir / "verdicts.csv", index=False)
    manifest = [{"slug": f.slug, "file": names[f.slug], "title": f.title, "caption": f.caption, "meta": f.meta}
                for f in figures_of(doc)]
    atomic_write_text(out_dir / "figures.json", json.dumps(manifest, indent=1, default=str) + "\n")
    html_path = out_dir / "report.html"
    atomic_write_text(html_path, to_html(doc))
    bar.update(2)
    bar.close()
    if progress:
        print(f"report: {html_path} ({time.perf_counter() - t0:.1f} s)")
    return html_path


def _publish_csv(df: pd.DataFrame, path: Path, *, index: bool = True) -> None:
    atomic_write_text(path, df.to_csv(index=index))


def build_report(*, grid_dir: str | Path, out_dir: str | Path | None = None, baseline: str | None = None,
                 arm_order: Sequence[str] | None = None, band: Band = "minmax", max_points: int = 400,
                 primary_nfe: int | None = None,
                 sample_seed: int | None = None, studies: Sequence["optuna.Study"] | None = None,
                 claims: Sequence["Claim"] | None = None, claims_source: str = "",
                 progress: bool = True) -> Path:
    """Report of the grid in ``grid_dir`` (default output: ``grid_dir/report``); returns report.html's path.

    ``studies``: Optuna studies for the study section; None looks for ``*.journal`` in the grid directory.
    ``claims``: the claims the verdict section judges, and ``claims_source`` where they come from (default: the
    claims of the grid's own matrix, from the grid manifest).
    """
    grid_dir = Path(grid_dir)
    data = load_grid(grid_dir=grid_dir, arm_order=arm_order)
    if studies is None:
        from .study import find_studies

        studies = find_studies(grid_dir)
    return write_report(data, out_dir=out_dir if out_dir is not None else grid_dir / "report", baseline=baseline,
                        band=band, max_points=max_points,
                        primary_nfe=primary_nfe, sample_seed=sample_seed, studies=studies, claims=claims,
                        claims_source=claims_source, progress=progress)
