"""Per-run and per-arm numbers, paired differences (``harness.inference``'s t-intervals), and the findings' flags
(numbers only: how they are written is ``reports.formatting``).

Everything is computed with pandas group-bys over the telemetry table; a value
that is missing or non-finite in a run is left out of that run's statistic and
the number of seeds that did contribute is kept beside it, so a mean over two
surviving seeds is never shown as a mean over three.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import pandas as pd

from harness.collect import GRAD_NORM_KEYS, run_divergence

from harness.inference import ALPHA, Paired, t_interval
from scipy import stats as sps

from .data import GridData, GridDataError

RUN_KEYS = ["arm", "seed"]
SAMPLE_METRICS = ("fd", "kid", "reward", "accuracy", "gold", "proxy")
"""Student sample metrics per NFE (``val/<what>_nfe<n>``); kid: the kernel distance beside FD (lower-better, like
FD); gold and proxy: the preference score and its learned proxy, where the trainer writes them."""
LOWER_BETTER = ("fd", "kid")
"""The sample metrics that are distances to the reference set (lower is better); the others are higher-better."""


# --------------------------------------------------------------------------- per run


def max_grad_column(data: GridData) -> str | None:
    """The pre-clip grad-norm column the maxima come from.

    ``grad_norm/max`` (the largest pre-clip norm since the previous record, when the
    trainer logs it) sees every step; ``grad_norm/total`` only the logged steps.
    """
    for key in GRAD_NORM_KEYS:
        if data.has(key):
            return key
    return None


def _by_run(df: pd.DataFrame):
    return df.groupby(RUN_KEYS, observed=True, sort=False)


_AT_STEP = r"at step (\d+)"


def diverge_steps(reason: pd.Series, status_step: pd.Series) -> pd.Series:
    """The step a run was declared diverged: the trainer's reason names it ("... at step 812");
    the status step (the last one recorded) where the reason does not."""
    named = reason.astype("string").str.extract(_AT_STEP, expand=False).astype(float)
    return named.fillna(status_step.astype(float))


def run_table(data: GridData) -> pd.DataFrame:
    """One row per run (index arm, seed): validation, sample metrics, gradients, divergence, wall time."""
    m = data.metrics
    st = data.statuses.set_index(RUN_KEYS)
    runs = pd.MultiIndex.from_frame(pd.concat([data.statuses[RUN_KEYS], m[RUN_KEYS]]).drop_duplicates())
    out = pd.DataFrame(index=runs).sort_index()
    out["state"] = st["state"].reindex(out.index).fillna("unknown")
    out["reason"] = st["reason"].reindex(out.index)
    if "fork" in st.columns:  # a forked run: whose records its first steps are (harness.collect.run_statuses)
        out["fork"] = st["fork"].reindex(out.index)

    train = m[m["kind"] == "train"]
    out["last_step"] = _by_run(train)["step"].max().reindex(out.index)

    val = m[m["kind"] == "val"].sort_values("step", kind="stable")
    sample_keys = [f"val/{what}_nfe{n}" for n in data.nfe for what in SAMPLE_METRICS]
    sample_keys = [k for k in sample_keys if k in val.columns]
    if "val/loss" in val.columns and len(val):
        last = _by_run(val).tail(1).set_index(RUN_KEYS)
        # a diverged or failed run has no final weights: its last validation is from before it broke,
        # and counting it as "final" would make an unstable arm look as good as its last good moment
        ended_badly = out["state"].isin(["diverged", "failed"])
        out["final_val_loss"] = last["val/loss"].reindex(out.index).mask(ended_badly)
        out["final_val_step"] = last["step"].reindex(out.index).mask(ended_badly)
        for k in sample_keys:
            out[k.removeprefix("val/")] = last[k].reindex(out.index).mask(ended_badly)
        finite = val[np.isfinite(val["val/loss"])]
        if len(finite):
            # sorted by step, so idxmin keeps the earliest of equal minima
            best = finite.loc[_by_run(finite)["val/loss"].idxmin()].set_index(RUN_KEYS)
            out["best_val_loss"] = best["val/loss"].reindex(out.index)
            out["best_val_step"] = best["step"].reindex(out.index)
            for k in sample_keys:
                out[k.removeprefix("val/") + "@best"] = best[k].reindex(out.index)
        out["val_nonfinite"] = _by_run(val)["val/loss"].agg(lambda s: int((~np.isfinite(s)).sum())).reindex(out.index)

    # the divergence numbers of each run come from the harness's one function for them
    groups = list(_by_run(train)) if len(train) else []
    if groups:
        div = pd.DataFrame([run_divergence(g.sort_values("step", kind="stable")) for _, g in groups],
                           index=pd.MultiIndex.from_tuples([k for k, _ in groups], names=RUN_KEYS))
    else:
        div = pd.DataFrame(index=out.index, columns=["max_grad_norm", "grad_norm_nonfinite", "n_spikes",
                                                     "nonfinite_steps"], dtype=float)
    if max_grad_column(data) is not None:
        out["max_grad_norm"] = div["max_grad_norm"].reindex(out.index)
        out["grad_norm_nonfinite"] = div["grad_norm_nonfinite"].reindex(out.index)
    if data.has("count/spikes") or data.has("event/spike"):
        out["spikes"] = div["n_spikes"].reindex(out.index)
    if data.has("count/nonfinite"):
        out["nonfinite_steps"] = div["nonfinite_steps"].reindex(out.index)

    out["diverged"] = out["state"] == "diverged"
    out["diverge_step"] = diverge_steps(out["reason"], st["step"].reindex(out.index)).where(out["diverged"])
    wall = st["wall_s"].reindex(out.index)
    if "time/wall_s" in m.columns:
        wall = wall.fillna(_by_run(m)["time/wall_s"].max().reindex(out.index))
    out["wall_s"] = wall
    return out


def teacher_values(data: GridData) -> dict[str, float]:
    """The teacher line's metrics (mean over runs; they share one cached teacher, so they agree)."""
    t = data.metrics[data.metrics["kind"] == "teacher"]
    keys = [c for c in t.columns if str(c).startswith("teacher/") and t[c].notna().any()]
    return {k: float(t[k].mean()) for k in keys}


def teacher_spread(data: GridData) -> dict[str, float]:
    """Max - min of each teacher metric over runs (non-zero: the runs did not share one teacher)."""
    t = data.metrics[data.metrics["kind"] == "teacher"]
    keys = [c for c in t.columns if str(c).startswith("teacher/") and t[c].notna().any()]
    return {k: float(t[k].max() - t[k].min()) for k in keys}


# --------------------------------------------------------------------------- per arm


@dataclass(frozen=True, slots=True)
class MetricSpec:
    key: str
    """Column of the run table."""
    label: str
    """Short name in tables and sentences."""
    mode: Literal["abs", "rel"]
    """Difference as arm - baseline (abs) or mean(arm) / mean(baseline) - 1 (rel, for positive scale-like values)."""
    better: Literal["lower", "higher", "none"]
    """Which direction is an improvement (none: no judgement, e.g. wall time)."""
    agg: Literal["mean", "median"] = "mean"
    """How the arm's value is summarised over seeds."""


def metric_specs(nfe: Sequence[int], primary_nfe: int | None) -> list[MetricSpec]:
    specs = [MetricSpec("best_val_loss", "best val loss", "abs", "lower"),
             MetricSpec("final_val_loss", "final val loss", "abs", "lower")]
    specs += [MetricSpec(f"fd_nfe{n}", f"FD@{n}", "abs", "lower") for n in nfe]
    specs += [MetricSpec(f"kid_nfe{n}", f"KID@{n}", "abs", "lower") for n in nfe]  # skipped where not written
    if primary_nfe is not None:
        specs += [MetricSpec(f"{what}_nfe{primary_nfe}", f"{what}@{primary_nfe}", "abs", "higher")
                  for what in SAMPLE_METRICS if what not in LOWER_BETTER]
    specs += [MetricSpec("max_grad_norm", "max grad norm", "rel", "lower"),
              MetricSpec("spikes", "spikes", "abs", "lower"),
              MetricSpec("wall_s", "wall time", "rel", "none")]
    return specs


def resolve_primary_nfe(nfe: Sequence[int], primary_nfe: int | None) -> int | None:
    """The NFE whose reward/accuracy go in the summary: the one asked for, else 2, else the smallest."""
    if primary_nfe is not None:
        if primary_nfe not in nfe:
            raise GridDataError(f"primary_nfe={primary_nfe} has no validation sample metrics; "
                             f"NFEs in the grid: {list(nfe)}")
        return primary_nfe
    if not nfe:
        return None
    return 2 if 2 in nfe else min(nfe)


def arm_table(runs: pd.DataFrame, arms: Sequence[str], specs: Sequence[MetricSpec]) -> pd.DataFrame:
    """One row per arm: run counts, divergence, and each metric's summary over seeds with its seed count."""
    g = runs.groupby(level="arm", observed=True, sort=False)
    out = pd.DataFrame(index=pd.Index(list(arms), name="arm"))
    out["runs"] = g.size().reindex(out.index).fillna(0).astype(int)
    out["done"] = g["state"].agg(lambda s: int((s == "done").sum())).reindex(out.index).fillna(0).astype(int)
    out["diverged"] = g["diverged"].sum().reindex(out.index).fillna(0).astype(int)
    out["failed"] = g["state"].agg(lambda s: int((s == "failed").sum())).reindex(out.index).fillna(0).astype(int)
    out["median_diverge_step"] = g["diverge_step"].median().reindex(out.index)
    if "best_val_step" in runs.columns:
        out["best_val_step"] = g["best_val_step"].median().reindex(out.index)
    for spec in specs:
        if spec.key not in runs.columns:
            continue
        v = runs[spec.key].where(np.isfinite(runs[spec.key].astype(float)))
        gv = v.groupby(level="arm", observed=True, sort=False)
        out[spec.key] = (gv.mean() if spec.agg == "mean" else gv.median()).reindex(out.index)
        out[spec.key + ":n"] = gv.count().reindex(out.index).fillna(0).astype(int)
    return out


# --------------------------------------------------------------------------- differences


def paired_interval(a: np.ndarray, b: np.ndarray, *, mode: Literal["abs", "rel"]) -> tuple[float, float, float, float]:
    """Estimate, unadjusted 95% interval and two-sided t-test p of paired samples (a[i], b[i]), from
    ``harness.inference`` (the verdicts' engine). ``abs``: mean(a - b); ``rel``: the geometric-mean ratio - 1
    (paired log-ratios, positive values only). Fewer than two pairs: the estimate only."""
    if mode not in ("abs", "rel"):
        raise ValueError(f"mode must be 'abs' or 'rel' (got {mode!r})")
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired samples need equal 1-d shapes (got {a.shape} and {b.shape})")
    if a.size == 0:
        return math.nan, math.nan, math.nan, math.nan
    if mode == "rel" and (np.any(a <= 0) or np.any(b <= 0)):
        return math.nan, math.nan, math.nan, math.nan  # a ratio is meaningless off the positive axis
    d = np.log(a / b) if mode == "rel" else a - b
    p = Paired.of(d)
    lo, hi = t_interval(p, ALPHA) if p.n >= 2 else (math.nan, math.nan)
    if p.n >= 2 and p.sd > 0:
        pval = float(2 * sps.t.sf(abs(p.mean) / (p.sd / math.sqrt(p.n)), p.n - 1))
    else:
        pval = math.nan if p.n < 2 else (1.0 if p.mean == 0 else 0.0)
    back = (lambda v: math.exp(v) - 1.0) if mode == "rel" else (lambda v: v)
    return back(p.mean), back(lo), back(hi), pval


def compare(runs: pd.DataFrame, *, arm: str, ref: str, specs: Sequence[MetricSpec]) -> pd.DataFrame:
    """Differences arm - ref over seeds present (with a finite value) in both, per metric: the unadjusted 95%
    paired t-interval (exploratory: only the claims' verdicts are corrected for multiplicity)."""
    rows = []
    for spec in specs:
        if spec.key not in runs.columns:
            continue
        col = runs[spec.key].astype(float)
        a = col.xs(arm, level="arm") if arm in col.index.get_level_values("arm") else col.iloc[:0]
        b = col.xs(ref, level="arm") if ref in col.index.get_level_values("arm") else col.iloc[:0]
        pair = pd.concat({"a": a, "b": b}, axis=1, join="inner")
        pair = pair[np.isfinite(pair["a"]) & np.isfinite(pair["b"])].sort_index()
        est, lo, hi, p = paired_interval(pair["a"].to_numpy(), pair["b"].to_numpy(), mode=spec.mode)
        has_ci = math.isfinite(lo) and math.isfinite(hi)
        flag = (lo > 0 or hi < 0) if has_ci else None
        rows.append({"arm": arm, "ref": ref, "key": spec.key, "metric": spec.label, "mode": spec.mode,
                     "better": spec.better, "n_pairs": len(pair), "seeds": ",".join(map(str, pair.index)),
                     "estimate": est, "lo": lo, "hi": hi, "excludes_zero": flag, "p": p})
    return pd.DataFrame(rows)


def compare_all(runs: pd.DataFrame, *, arms: Sequence[str], baseline: str, specs: Sequence[MetricSpec]) -> pd.DataFrame:
    parts = [compare(runs, arm=a, ref=baseline, specs=specs) for a in arms if a != baseline]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


# --------------------------------------------------------------------------- findings


def excludes_zero(value) -> bool:
    """The comparison's flag as a plain bool (None/NA: no interval, so no claim)."""
    return value is not None and not pd.isna(value) and bool(value)
